"Known-value tests of vtp_nbdev.losses (single process)."
import math, warnings
import pytest, torch
import torch.nn.functional as F
from safetensors.torch import save_file
from vtp_nbdev import losses as L
from vtp_nbdev.discriminator import PatchGANDiscriminator


def test_clip_known_values():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(16, 64), dim=-1)
    assert L.ClipLoss()(f, f, L.exp_logit_scale(torch.tensor(10.))) < 1e-6      # scale clamped to 100
    B = 256
    a, b = F.normalize(torch.randn(B, 512), dim=-1), F.normalize(torch.randn(B, 512), dim=-1)
    for local in (True, False):
        assert abs(L.ClipLoss(local_loss=local)(a, b, torch.tensor(1.)).item() - math.log(B)) < 0.05


def test_clip_matches_reference_formula():
    torch.manual_seed(1)
    a, b, s = torch.randn(8, 4), torch.randn(8, 4), torch.tensor(3.)
    logits = s * a @ b.T
    ref = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    assert torch.allclose(L.ClipLoss()(a, b, s), ref)
    with pytest.raises(ValueError, match='same'): L.ClipLoss()(a, b[:4], s)


def test_logit_scale():
    assert math.isclose(L.exp_logit_scale(torch.tensor(L.LOGIT_SCALE_INIT)).item(), 1 / 0.07, rel_tol=1e-5)
    assert math.isclose(L.exp_logit_scale(torch.tensor(7.)).item(), 100., rel_tol=1e-5)


def test_siglip_known_value():
    e = torch.eye(2)
    v = L.SigLipLoss()(e, e, torch.tensor(10.), torch.tensor(-10.))
    assert math.isclose(v.item(), math.log(2) + math.log1p(math.exp(-10)), rel_tol=1e-5)


def test_dino_uniform_is_log_k():
    K, B = 64, 5
    d = L.DINOLoss(K)
    t = d.softmax_center_teacher(torch.zeros(B, K), 0.04)
    s = [torch.full((B, K), 2.) for _ in range(6)]
    assert abs(d(s, [t, t]).item() - math.log(K)) < 1e-6
    t_sk = d.sinkhorn_knopp_teacher(torch.zeros(B, K), 0.04)
    assert abs(d(s, [t_sk, t_sk]).item() - math.log(K)) < 1e-5


def test_dino_pairs_skip_same_view():
    K, B = 8, 3
    d = L.DINOLoss(K, student_temp=0.1)
    torch.manual_seed(0)
    s = [torch.randn(B, K) for _ in range(4)]
    t = [F.softmax(torch.randn(B, K), -1) for _ in range(2)]
    ce = lambda ti, si: -(ti * F.log_softmax(si / 0.1, -1)).sum(-1).mean()
    ref = sum(ce(t[i], s[j]) for i in range(2) for j in range(4) if i != j) / 6
    assert torch.allclose(d(s, t), ref)


def test_center_ema():
    K = 6
    d = L.DINOLoss(K, center_momentum=0.9)
    torch.manual_seed(0)
    c = torch.zeros(1, K)
    for _ in range(3):
        t = torch.randn(10, K)
        d.update_center(t)
        c = 0.9 * c + 0.1 * t.mean(0, keepdim=True)
        assert torch.allclose(d.center, c, atol=1e-6)
    p = d.teacher_probs(torch.zeros(2, K), 0.1)                     # centred softmax, then updates the centre
    assert torch.allclose(p, F.softmax(-c / 0.1, -1).expand(2, K), atol=1e-6)
    assert torch.allclose(d.center, 0.9 * c, atol=1e-6)


def test_sinkhorn_sums():
    torch.manual_seed(0)
    q = L.sinkhorn_knopp(torch.randn(20, 7), 0.1)
    assert torch.allclose(q.sum(-1), torch.ones(20), atol=1e-5)
    q = L.sinkhorn_knopp(torch.randn(4, 5, 7), 0.5, n_iterations=300)    # any leading shape
    assert q.shape == (4, 5, 7)
    assert torch.allclose(q.sum(-1), torch.ones(4, 5), atol=1e-5)
    assert torch.allclose(q.reshape(-1, 7).sum(0), torch.full((7,), 20 / 7), atol=1e-3)


def test_ibot_uniform_and_per_image_weighting():
    K, B, N = 16, 3, 5
    il = L.iBOTPatchLoss(K)
    masks = torch.zeros(B, N, dtype=torch.bool); masks[0, :1] = True; masks[1, :4] = True; masks[2, :2] = True
    M = int(masks.sum())
    t = il.softmax_center_teacher(torch.ones(M, K), 0.04)
    assert abs(il(torch.zeros(M, K), t, masks).item() - math.log(K)) < 1e-6
    torch.manual_seed(0)
    s, tt = torch.randn(B, N, K), F.softmax(torch.randn(B, N, K), -1)
    ce = -(tt * F.log_softmax(s / 0.1, -1)).sum(-1)                       # (B, N)
    ref = torch.stack([ce[b][masks[b]].mean() for b in range(B)]).mean()
    assert torch.allclose(il(s, tt, masks), ref)
    assert torch.allclose(il(s[masks], tt[masks], masks), ref)          # masked-only inputs
    with pytest.raises(ValueError, match='masks select'): il(s[masks][:2], tt[masks], masks)


def test_koleo_known_value():
    sq = torch.tensor([[2., 0], [0, 1], [-1, 0], [0, -5]])
    assert math.isclose(L.KoLeoLoss()(sq).item(), -0.5 * math.log(2), rel_tol=1e-5)
    x = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1]])               # mutual distance √2
    assert math.isclose(L.KoLeoLoss()(x).item(), -0.5 * math.log(2), rel_tol=1e-5)
    with pytest.raises(ValueError, match='at least 2'): L.KoLeoLoss()(x[:1])


@pytest.fixture(scope='module')
def lpips_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('lpips')
    sd = L.random_lpips_state_dict(seed=3)
    save_file(sd, str(d/'merged.safetensors'))
    vgg = {k: v for k, v in sd.items() if k.startswith('features.')}
    vgg['classifier.0.weight'] = torch.zeros(2, 2)                     # torchvision extras are ignored
    torch.save(vgg, d/'vgg16.pth')
    torch.save({k: v for k, v in sd.items() if k.startswith('lin')}, d/'lin.pth')
    # the lpips package's own key layout: net.slice<k>.<i>.*
    slices = [(1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30)]
    pk = {}
    for k, v in vgg.items():
        if not k.startswith('features.'): continue
        i = int(k.split('.')[1]); sl = next(n for n, a, b in slices if a <= i < b)
        pk[f'net.slice{sl}.{i}.{k.split(".")[2]}'] = v
    pk.update({k: v for k, v in sd.items() if k.startswith('lin')})
    torch.save(pk, d/'lpips_pkg.pth')
    return d


def test_lpips_loading(lpips_files):
    d = lpips_files
    a = L.LPIPS(d/'merged.safetensors'); b = L.LPIPS([d/'vgg16.pth', d/'lin.pth']); c = L.LPIPS(d/'lpips_pkg.pth')
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(a(x, x), torch.zeros(2), atol=1e-7)
    va = a(x, y); assert (va > 0).all()
    assert torch.allclose(va, b(x, y)) and torch.allclose(va, c(x, y))
    a.train(); assert not a.training
    with pytest.raises(KeyError, match='missing keys'): L.LPIPS(d/'lin.pth')
    with pytest.raises(FileNotFoundError, match='nope'): L.LPIPS(d/'nope.pth')


def test_reconstruction_warns_once_and_pixel_only(tmp_path, lpips_files):
    L._WARNED.discard('lpips')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        r = [L.ReconstructionLoss(), L.ReconstructionLoss(tmp_path/'absent.safetensors'), L.ReconstructionLoss()]
        x, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
        for m in r: assert torch.allclose(m(x, y), (x - y).abs().mean())
    assert len([x for x in w if 'LPIPS disabled' in str(x.message)]) == 1
    assert not any(m.perceptual_enabled for m in r)
    rl = L.ReconstructionLoss(lpips_files/'merged.safetensors', perceptual_weight=0.25)
    assert rl.perceptual_enabled
    o = rl(x, y, output_dict=True)
    assert torch.allclose(o['rec'], o['l1'] + 0.25 * o['lpips']) and o['lpips'] > 0
    assert rl(x, x).abs() < 1e-6
    assert not any(k.startswith(('mean', 'std')) for k in rl.state_dict())
    with pytest.raises(ValueError, match='differ'): rl(x, y[:1])


def test_gan():
    assert math.isclose(L.hinge_d_loss(torch.tensor([1., 3.]), torch.tensor([-1., -4.])).item(), 0.)
    assert math.isclose(L.hinge_d_loss(torch.tensor([0., 0.]), torch.tensor([0., 0.])).item(), 1.)
    assert math.isclose(L.hinge_d_loss(torch.tensor([-1.]), torch.tensor([2.])).item(), (2 + 3) / 2)
    assert math.isclose(L.hinge_g_loss(torch.tensor([2., 4.])).item(), -3.)
    for norm in ('batch', 'spectral', 'none'):
        D = PatchGANDiscriminator(in_ch=3, ch=4, n_layers=3, norm=norm)
        assert D(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    w = torch.ones(3, requires_grad=True)
    rec, g = (2 * w).sum(), (0.5 * w).sum()
    assert math.isclose(L.adaptive_gan_weight(rec, g, w).item(), 2 * 3 ** .5 / (0.5 * 3 ** .5 + 1e-4), rel_tol=1e-5)


def test_presets_and_total():
    assert L.LOSS_PRESETS['AE'] == dict(clip=0, ssl=0, rec=1)
    for k in ('CLIP+AE', 'SSL+AE', 'CLIP+SSL+AE'): assert L.LOSS_PRESETS[k]['rec'] == 0.1
    t = dict(clip=torch.tensor(1.), dino=torch.tensor(2.), ibot=torch.tensor(3.), rec=torch.tensor(4.))
    assert math.isclose(L.total_loss(t, L.LOSS_PRESETS['CLIP+SSL+AE']).item(), 1 + 5 + 0.4, rel_tol=1e-6)
    assert math.isclose(L.total_loss(t, L.LOSS_PRESETS['CLIP+AE']).item(), 1 + 0.4, rel_tol=1e-6)
    assert math.isclose(L.total_loss(dict(rec=torch.tensor(4.)), 'AE').item(), 4.)
    with pytest.raises(KeyError, match="'dino' is missing"): L.total_loss(dict(clip=t['clip'], rec=t['rec']), 'SSL+AE')
    with pytest.raises(KeyError, match='unknown term'): L.total_loss({**t, 'gan': t['rec']}, 'AE')
    with pytest.raises(ValueError, match='every weight is 0'): L.total_loss(t, dict(clip=0, ssl=0, rec=0))


def test_teacher_temp_schedule():
    assert L.teacher_temp_schedule(0, 10) == 0.04 and L.teacher_temp_schedule(10, 10) == 0.07
    assert math.isclose(L.teacher_temp_schedule(5, 10), 0.055)
    assert L.teacher_temp_schedule(3, 10, start=0.0, end=1.0) == 0.3
