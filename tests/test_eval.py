"Evaluation: FID-family sanity (reference extractors, torch-fidelity), bad inputs, checksums, reconstruction, zero-shot, probes."
import json, time
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from vtp_nbdev.data import ShapesDataset, uint8_to_model, normalize, denormalize, zero_shot_prompts, tokenize, SHAPES_CLASSES
from vtp_nbdev import fid
from vtp_nbdev.fid import (REFERENCE_EXTRACTORS, ChecksumError, FeatureSet, check_batch, extract_features, fidelity_metrics,
                           load_reference_extractor, make_extractor, save_samples, torch_fidelity_metrics, sha256_file, repo_root)
from vtp_nbdev.eval_understanding import zero_shot, linear_probe, train_linear_probe
from vtp_nbdev.eval_reconstruction import reconstruction_metrics, evaluate_tokenizer, psnr, ssim


def shapes_images(split, n):
    "ImageNet-normalised shapes images (n, 3, 32, 32) without captions (fast)."
    ds = ShapesDataset(split, size=n)
    return torch.stack([uint8_to_model(ds.raw(i)[0]) for i in range(n)])


@pytest.fixture(scope='module')
def real():
    return shapes_images('test', 1000)


@pytest.fixture(scope='module')
def ref_feats():
    return extract_features(shapes_images('val', 1000), 'shapes')


# ---- committed reference extractors ----
@pytest.mark.parametrize('name', list(REFERENCE_EXTRACTORS))
def test_committed_weights_match_checksum_and_are_small(name):
    rel, sha, _ = REFERENCE_EXTRACTORS[name]
    p = repo_root()/rel
    assert p.is_file(), p
    assert sha256_file(p) == sha
    assert p.stat().st_size < 2 * 2**20
    report = json.loads(p.with_suffix('.json').read_text())
    assert report['sha256'] == sha
    assert report['accuracy']['test']['logits'] > (0.97 if name == 'shapes' else 0.88)


def test_checksum_mismatch_detected(tmp_path):
    src = repo_root()/REFERENCE_EXTRACTORS['shapes'][0]
    bad = tmp_path/'shapes.safetensors'
    b = bytearray(src.read_bytes()); b[len(b) // 2] ^= 0x10; bad.write_bytes(bytes(b))
    with pytest.raises(ChecksumError, match='sha256'):
        load_reference_extractor('shapes', bad)
    with pytest.raises(ChecksumError):                               # also through the torch-fidelity extractor
        make_extractor('shapes', weights_path=bad)
    with pytest.raises(KeyError, match='no reference extractor'):
        load_reference_extractor('cifar10')


# ---- FD / KID / IS / precision-recall sanity ----
@pytest.mark.parametrize('name', list(REFERENCE_EXTRACTORS))
def test_identical_sets(name, real):
    f = extract_features(real, name)
    m = fidelity_metrics(f, f, extractor=name)
    assert abs(m[f'FD_{name}']) < 1e-3
    assert m[f'precision_{name}'] == pytest.approx(1.0) and m[f'recall_{name}'] == pytest.approx(1.0)
    assert abs(m[f'KID_{name}_mean']) < 0.02                   # unbiased MMD of a set with itself: -O(1/n)
    assert m['extractor'] == f'vtp-ref-{name}' and m['extractor_sha256'] == REFERENCE_EXTRACTORS[name][1]
    assert m['n1'] == m['n2'] == 1000 and m['uint8_policy'] == 'round'
    assert 'FID' not in m                                            # never labelled as Inception FID


def _fd(images, ref):
    return fidelity_metrics(images, ref, metrics=('fd',))['FD_shapes']


def test_fd_monotone_in_gaussian_noise(real, ref_feats):
    px = denormalize(real)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(px.shape, generator=g)
    fds = [_fd(normalize((px + s * noise).clamp(0, 1)), ref_feats) for s in (0, 0.03, 0.06, 0.12, 0.25)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert fds[0] < 0.1 * fds[-1]


def test_fd_monotone_in_blur(real, ref_feats):
    px = denormalize(real)
    blur = lambda s: px if s == 0 else TF.gaussian_blur(px, 2 * int(3 * s) + 1, s)
    fds = [_fd(normalize(blur(s)), ref_feats) for s in (0, 0.6, 1.0, 1.5, 2.5)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_is_and_prc_react_to_degradation(real, ref_feats):
    clean = fidelity_metrics(real, ref_feats, kid_subset_size=500, kid_subsets=20)
    noisy = fidelity_metrics(normalize((denormalize(real) + 0.3 * torch.randn_like(real)).clamp(0, 1)), ref_feats, kid_subset_size=500, kid_subsets=20)
    assert noisy['KID_shapes_mean'] > clean['KID_shapes_mean'] and noisy['precision_shapes'] < clean['precision_shapes']
    assert clean['IS_shapes_mean'] > 10 and noisy['IS_shapes_mean'] < clean['IS_shapes_mean']


def test_torch_fidelity_registered_extractor_agrees(real, tmp_path):
    a, b = real[:300], shapes_images('val', 300)
    ours = fidelity_metrics(a, b, kid_subset_size=200)
    save_samples(a, tmp_path/'png', fmt='png')                     # PNG folder: read by torch-fidelity itself
    for src in (a, tmp_path/'png'):
        tf = torch_fidelity_metrics(src, b, kid_subset_size=200)
        for k in ('FD_shapes', 'KID_shapes_mean', 'IS_shapes_mean', 'precision_shapes', 'recall_shapes'):
            assert tf[k] == pytest.approx(ours[k], rel=1e-4, abs=1e-5), k


def test_sources_agree_and_stream(real, tmp_path):
    x = real[:250]
    f = extract_features(x, 'shapes', batch_size=64)
    save_samples(x, tmp_path/'st', shard_size=100)
    save_samples(x[:30], tmp_path/'png', fmt='png')
    torch.testing.assert_close(extract_features(tmp_path/'st').feats['feat'], f.feats['feat'])
    torch.testing.assert_close(extract_features(tmp_path/'png').feats['feat'], f.feats['feat'][:30])
    torch.testing.assert_close(extract_features(fid.check_batch(x)).feats['feat'], f.feats['feat'])   # uint8 == rounded float
    gen = ({'image': x[i:i + 32]} for i in range(0, 250, 32))
    g = extract_features(gen, n=100)
    assert g.n == 100 and set(g.feats) == set(f.feats)
    f.save(tmp_path/'f.safetensors')
    assert FeatureSet.load(tmp_path/'f.safetensors').n == 250


# ---- bad inputs ----
@pytest.mark.parametrize('bad, exc, msg', [
    (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), ValueError, '3 RGB channels'),
    (torch.zeros(3, 32, 32, dtype=torch.uint8), ValueError, r'\(B, 3, H, W\)'),
    (torch.zeros(2, 3, 32, 32, dtype=torch.int64), ValueError, 'dtype torch.int64'),
    (torch.full((2, 3, 32, 32), 200.), ValueError, r'\[0, 255\] pixels'),
    (torch.full((2, 3, 32, 32), float('nan')), ValueError, 'NaN'),
    (torch.zeros(2, 3, 32, 32).numpy(), TypeError, 'torch.Tensor'),
])
def test_bad_batches(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        check_batch(bad)
    with pytest.raises((exc, ValueError, TypeError), match=msg):
        extract_features([bad])


def test_reference_extractor_reads_any_size(real, ref_feats):
    "32-px images go in unchanged; other sizes are resized as torch-fidelity resizes for Inception."
    x = check_batch(real[:200])
    net = load_reference_extractor('shapes')
    assert torch.equal(extract_features(x, 'shapes').feats['feat'], net(x)['feat'])          # no resize at 32 px
    x64 = x.repeat_interleave(2, -1).repeat_interleave(2, -2)       # 2x2 blocks: the 2x downsample gives x back
    torch.testing.assert_close(extract_features(x64, 'shapes').feats['feat'], net(x)['feat'])
    m = fidelity_metrics(x64, x, metrics=('fd',))
    assert abs(m['FD_shapes']) < 1e-3 and m['n1'] == m['n2'] == 200
    x28 = F.interpolate(x.float(), size=(28, 28), mode='area').round().to(torch.uint8)
    assert extract_features(x28, 'shapes').n == 200                 # a smaller size is upsampled
    with pytest.raises(ValueError, match='expects 32x32'):           # check_batch still checks the size it is given
        check_batch(x28)
    with pytest.raises(ValueError, match='3 RGB channels'):
        extract_features([x64[:, :1]])


def test_retrieval_with_shared_captions():
    "Captions shared by several images: an item with the same caption is a hit; distinct captions: the own pair only."
    from vtp_nbdev.eval_understanding import retrieval_recall, caption_groups
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(30, 30, generator=g)
    assert retrieval_recall(sim, groups=torch.arange(30)) == retrieval_recall(sim)
    groups = caption_groups([f'class {i % 3}' for i in range(30)])  # 3 captions, 10 images each
    r = retrieval_recall(sim, ks=(1, 3), groups=groups)
    assert r['image_to_text_R@3'] == 1.0                           # 3 distinct captions: always within the top 3
    best = sim.masked_fill(groups[:, None] != groups[None, :], float('-inf')).max(0).values
    others = sim.masked_fill(groups[:, None] == groups[None, :], float('-inf'))
    assert r['text_to_image_R@1'] == (others.max(0).values < best).double().mean().item()
    sim_own = torch.eye(30) * 20 + sim                             # own pair always first: a hit under both rules
    assert retrieval_recall(sim_own, ks=(1,), groups=groups) == {'image_to_text_R@1': 1.0, 'text_to_image_R@1': 1.0}


def test_bad_sources(tmp_path, real):
    with pytest.raises(FileNotFoundError, match='no \\*.png files'):
        extract_features(tmp_path)
    save_samples(real[:4], tmp_path, fmt='png'); save_samples(real[:4], tmp_path)
    with pytest.raises(ValueError, match='both'):
        extract_features(tmp_path)
    with pytest.raises(ValueError, match='need a reference set'):
        fidelity_metrics(real[:10])
    with pytest.raises(ValueError, match='unknown metrics'):
        fidelity_metrics(real[:10], real[:10], metrics=('fid',))
    fm = extract_features(real[:20], 'fashion_mnist')
    with pytest.raises(ValueError, match='cached features are from vtp-ref-fashion_mnist'):
        fidelity_metrics(fm, real[:20], extractor='shapes')


def test_inception_offline_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv('VTP_INCEPTION_WEIGHTS', raising=False)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError, match='weights-inception-2015-12-05-6726825d.pth') as e:
            make_extractor('inception-v3-compat')
        assert '\n' not in str(e.value) and str(tmp_path) in str(e.value)
        with pytest.raises(FileNotFoundError, match='weights-inception'):
            fidelity_metrics(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), extractor='inception-v3-compat', metrics=('is',))
    finally:
        torch.hub.set_dir(old)


def test_inception_path_with_local_weights(tmp_path, monkeypatch):
    "The standard Inception path works once a weights file is local (a random-weight file stands in here)."
    import torch_fidelity.feature_extractor_inceptionv3 as inc
    with monkeypatch.context() as mp:                               # build a randomly initialised network to save
        mp.setattr(inc, 'load_state_dict_from_url', lambda *a, **k: None)
        mp.setattr(inc.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd: None)
        net = inc.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'])
    p = tmp_path/'weights-inception-2015-12-05-6726825d.pth'
    torch.save(net.state_dict(), p)
    monkeypatch.setenv('VTP_INCEPTION_WEIGHTS', str(p))
    x = torch.randint(0, 256, (6, 3, 48, 48), dtype=torch.uint8)   # any size: Inception resizes to 299
    m = fidelity_metrics(x, x, extractor='inception-v3-compat', metrics=('fd', 'is'), isc_splits=2)
    assert {'FID', 'IS_inception_mean'} <= set(m) and not any(k.startswith('FD_') for k in m)
    assert m['extractor'] == 'inception-v3-compat' and m['extractor_sha256'] == sha256_file(p) and m['n1'] == 6


def test_feature_extraction_speed():
    x = torch.randint(0, 256, (2000, 3, 32, 32), dtype=torch.uint8)
    fe = make_extractor('shapes')
    extract_features(x[:500], fe)
    t0 = time.perf_counter(); extract_features(x, fe); dt = time.perf_counter() - t0
    assert dt * 5 < 60, f"10k images would take {dt * 5:.1f} s"   # budget 30 s; slack for a shared machine


# ---- attributes (prompt following) ----
def test_attribute_accuracy_on_real_images():
    ds = ShapesDataset('test', size=300)
    x = torch.stack([uint8_to_model(ds.raw(i)[0]) for i in range(300)])
    acc = fid.attribute_accuracy(x, [ds.attributes(i) for i in range(300)])
    assert acc['attr_all_acc'] > 0.95
    shuffled = fid.attribute_accuracy(x, [ds.attributes((i + 1) % 300) for i in range(300)])
    assert shuffled['attr_all_acc'] < 0.2


# ---- reconstruction ----
class IdentityTokenizer(torch.nn.Module):
    def get_reconstruction_latents(self, x): return x
    def get_latents_decoded_images(self, z): return z


class NoisyTokenizer(IdentityTokenizer):
    def __init__(self, s): super().__init__(); self.s = s
    def get_latents_decoded_images(self, z): return z + self.s * torch.randn_like(z)


def test_reconstruction_metrics_identity_and_noise():
    ds = ShapesDataset('test', size=200)
    ident = reconstruction_metrics(IdentityTokenizer(), ds, n=200, dataset_name='shapes')
    assert abs(ident['rFID']) < 1e-3 and ident['ssim'] == pytest.approx(1.0) and ident['psnr'] > 140
    torch.manual_seed(0)
    noisy = [reconstruction_metrics(NoisyTokenizer(s), ds, n=200, dataset_name='shapes') for s in (0.05, 0.2)]
    assert noisy[0]['psnr'] > noisy[1]['psnr'] and noisy[0]['ssim'] > noisy[1]['ssim'] and noisy[0]['rFID'] < noisy[1]['rFID']
    assert abs(noisy[0]['psnr'] - noisy[0]['psnr_float']) < 1.0     # rounding moves PSNR a little at this noise level
    assert noisy[0]['rFID_metric'] == 'FD_shapes' and noisy[0]['extractor_sha256'] == REFERENCE_EXTRACTORS['shapes'][1]
    assert noisy[0]['lpips'] is None and 'lpips_note' in noisy[0]


def test_psnr_ssim_reference_values():
    x = torch.zeros(1, 3, 16, 16); y = x + 255 / 10 ** (20 / 20) * 1.0          # constant error: PSNR exactly 20 dB
    assert psnr(y, x).item() == pytest.approx(20.0, abs=1e-6)
    a = torch.rand(2, 3, 32, 32) * 255
    assert ssim(a, a).allclose(torch.ones(2, dtype=torch.float64)) and (ssim(a, 255 - a) < 0.1).all()


# ---- zero-shot and linear probe with a stub "tokenizer" whose features are the reference CNN's ----
class OracleTokenizer(torch.nn.Module):
    "Duck-typed VTP stand-in: image features = reference-CNN class one-hots; text features = the prompt's class one-hot."
    def __init__(self):
        super().__init__()
        self.net = load_reference_extractor('shapes')
        self.config = type('C', (), dict(text_context_length=32, vision_depth=2))()
        self.lookup = {}
        for w in ('train', 'heldout'):
            for c, ps in enumerate(zero_shot_prompts('shapes', SHAPES_CLASSES, w)):
                for t in tokenize(ps, 32): self.lookup[tuple(t.tolist())] = c
    def get_clip_text_feature(self, tokens, normalize=True):
        return F.one_hot(torch.tensor([self.lookup[tuple(t.tolist())] for t in tokens]), 20).float()
    def get_clip_image_feature(self, images, normalize=True):
        return F.one_hot(self.net(images)['logits'].argmax(1), 20).float()
    def get_intermediate_layers_feature(self, images, n, return_class_token=True):
        f = self.net(images)['feat']
        return tuple((f[:, None].expand(-1, 4, -1), f) for _ in range(n))
    def get_reconstruction_latents(self, images):
        return self.net(images)['feat'][:, :, None, None].expand(-1, -1, 2, 2)


def test_zero_shot_and_linear_probe_oracle():
    m = OracleTokenizer()
    zs = zero_shot(m, 'shapes', ShapesDataset('test', size=300), n=300)
    assert zs['zero_shot_top1_train'] > 0.95 and zs['zero_shot_top1_heldout'] > 0.95 and zs['zero_shot_top5_train'] >= zs['zero_shot_top1_train']
    assert zs['n_templates_train'] == 4 and zs['n_templates_heldout'] == 3
    lp = linear_probe(m, ShapesDataset('train', size=1000), ShapesDataset('test', size=400), epochs=20)
    for f in ('bottleneck', 'last', 'last4_avgpool'):
        assert lp[f'linear_probe_{f}_top1'] > 0.9, (f, lp[f'linear_probe_{f}'])
    assert lp['linear_probe_last4_avgpool']['dim'] == 3 * 128 and lp['n_blocks_last4'] == 2


def test_linear_probe_speed_5k_2k():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(20, 320, generator=g)
    ytr, yte = torch.randint(0, 20, (5000,), generator=g), torch.randint(0, 20, (2000,), generator=g)
    xtr, xte = c[ytr] + 3 * torch.randn(5000, 320, generator=g), c[yte] + 3 * torch.randn(2000, 320, generator=g)
    t0 = time.perf_counter(); r = train_linear_probe(xtr, ytr, xte, yte); dt = time.perf_counter() - t0
    assert r['top1'] > 0.5 and dt < 30, (r['top1'], dt)


def test_evaluate_tokenizer_checkpoint_folder(tmp_path):
    from vtp_nbdev.tokenizer import VTPModel, vtp_config
    torch.manual_seed(0)
    VTPModel(vtp_config('tiny')).save_pretrained(tmp_path/'ckpt')
    ev = evaluate_tokenizer(tmp_path/'ckpt', 'shapes', n_zero_shot=64, n_probe_train=200, n_probe_test=64, n_rec=32,
                            batch_size=32, out=tmp_path/'m.json')
    assert set(ev) >= {'zero_shot', 'linear_probe', 'reconstruction'} and not ev['notes']
    assert json.loads((tmp_path/'m.json').read_text())['reconstruction']['rFID_metric'] == 'FD_shapes'


def _shapes_folder(root, n=40):
    "A user's ImageNet-style folder of `shapes` images: `reddish/` (red objects) and `other/`."
    from PIL import Image
    ds = ShapesDataset('train', size=n)
    for i in range(n):
        img, _, label = ds.raw(i)
        d = root/('reddish' if label % 4 == 0 else 'other')
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d/f'{i}.png')
    return root


def test_evaluate_tokenizer_user_image_folder(tmp_path):
    "A user's folder: held-out split by key hash, zero-shot with the user's class names and templates, probe, rFD note."
    from vtp_nbdev.tokenizer import VTPModel, vtp_config
    root = _shapes_folder(tmp_path/'data')
    torch.manual_seed(0)
    kw = dict(root=root, val_frac=0.0, test_frac=0.4, class_names=['other thing', 'red thing'])
    ev = evaluate_tokenizer(VTPModel(vtp_config('tiny')), 'image_folder', n_zero_shot=40, n_probe_train=40,
                            n_probe_test=40, n_rec=8, dataset_kwargs=kw,
                            templates=['a photo of a {}.', 'a {}.'])
    n = ev['n_samples']
    assert n['train'] + n['test'] == 40 and n['test'] >= 8 and not ev['notes'], (n, ev['notes'])
    zs = ev['zero_shot']
    assert zs['n_classes'] == 2 and zs['zero_shot_top5_train'] == 1.0 and zs['n_templates_train'] == 2
    assert 'zero_shot_top1_heldout' not in zs and 'retrieval' not in ev
    assert ev['reconstruction']['rFID'] is None and 'train_reference_extractor' in ev['reconstruction']['rFID_note']
    assert ev['linear_probe']['linear_probe_last']['n_test'] == n['test']


def test_user_reference_extractor_for_rfd(tmp_path):
    "A reference network trained on the user's labelled folder by data_prep gives rFD as `FD_<name>`."
    import importlib.util
    from vtp_nbdev.fid import REFERENCE_EXTRACTORS
    from vtp_nbdev.tokenizer import VTPModel, vtp_config
    root = _shapes_folder(tmp_path/'pets', 60)
    script = Path(__file__).parents[1]/'data_prep'/'train_reference_extractor.py'
    spec = importlib.util.spec_from_file_location('tre', script)
    tre = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tre)
    try:
        path = tre.main(['--dataset', 'image_folder', '--root', str(root), '--out', str(tmp_path/'ref'),
                         '--epochs', '2', '--threads', '1'])
        assert path == tmp_path/'ref'/'pets.safetensors'
        assert json.loads((tmp_path/'ref'/'pets.json').read_text())['classes'] == ['other', 'reddish']
        torch.manual_seed(0)
        ev = evaluate_tokenizer(VTPModel(vtp_config('tiny')), 'image_folder', n_zero_shot=8, n_probe_train=16,
                                n_probe_test=8, n_rec=16, extractor=str(path), probe_features=('bottleneck',),
                                dataset_kwargs=dict(root=root, test_frac=0.3))
        rec = ev['reconstruction']
        assert rec['rFID_metric'] == 'FD_pets' and rec['rFID'] > 0 and rec['extractor'] == 'vtp-ref-pets', rec
    finally:
        REFERENCE_EXTRACTORS.pop('pets', None)
