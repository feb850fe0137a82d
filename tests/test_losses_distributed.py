"""Two gloo processes, each with half of a batch, reproduce the single-process losses, gradients and centres.

Equivalence worked out (W ranks, B local rows, features gathered with `gather_with_grad`):
- ClipLoss(local_loss=True): rank r's loss is the mean over its B rows of the full (WB x WB) problem, so the mean of
  the per-rank losses is the single-process loss. Backward through the gather sums every rank's gradient, so a rank's
  local feature gradient is W x the single-process gradient of its shard; DDP averages parameter gradients over ranks
  (divides by W), hence parameter gradients equal the single-process ones exactly.
- ClipLoss(local_loss=False): every rank computes the full loss; same W x feature-gradient factor.
- SigLipLoss: as local ClipLoss.
- DINO/iBOT centre: one all_reduce of (sum, count) -> the mean over the concatenated batch (ranks may differ in size).
- Sinkhorn-Knopp: every sum is all-reduced -> each rank gets its rows of the single-process result.
"""
import os, time
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

W, B, D, K = 2, 4, 8, 10
ROWS = (3, 5)          # unequal teacher rows per rank for the centre / Sinkhorn checks


def _data():
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(W * B, D, generator=g), torch.randn(W * B, D, generator=g)
    proj = torch.randn(D, D, generator=g) / D ** .5
    teacher = [torch.randn(sum(ROWS), K, generator=g) for _ in range(2)]
    return x_img, x_txt, proj, teacher


def _losses(rank_or_none, out):
    "Compute everything on the local shard (rank) or on the full batch (None); store results in `out`."
    from vtp_nbdev import losses as L
    x_img, x_txt, proj, teacher = _data()
    sl = slice(None) if rank_or_none is None else slice(rank_or_none * B, (rank_or_none + 1) * B)
    ts = slice(None) if rank_or_none is None else slice(sum(ROWS[:rank_or_none]), sum(ROWS[:rank_or_none + 1]))
    scale = torch.tensor(5.)
    for name, loss in (('clip_local', L.ClipLoss(local_loss=True)), ('clip_full', L.ClipLoss(local_loss=False)),
                       ('siglip', L.SigLipLoss())):
        img, txt = x_img[sl].clone().requires_grad_(), x_txt[sl].clone().requires_grad_()
        p = proj.clone().requires_grad_()                                # a shared "model" parameter
        fi, ft = F.normalize(img @ p, dim=-1), F.normalize(txt @ p, dim=-1)
        v = loss(fi, ft, scale, torch.tensor(-2.) if name == 'siglip' else None)
        v.backward()
        if rank_or_none is not None:                                     # what DDP does to parameter gradients
            dist.all_reduce(p.grad); p.grad /= dist.get_world_size()
        out[name] = dict(loss=v.detach(), g_img=img.grad, g_txt=txt.grad, g_proj=p.grad)
    for name, cls in (('dino', L.DINOLoss), ('ibot', L.iBOTPatchLoss)):
        m = cls(K)
        for t in teacher: m.update_center(t[ts])
        out[name + '_center'] = m.center.clone()
    out['sinkhorn'] = L.sinkhorn_knopp(teacher[0][ts], 0.07)
    out['gather'] = L.gather_with_grad(x_img[sl])


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=W)
    try:
        out = {}
        _losses(rank, out)
        torch.save(out, os.path.join(out_dir, f'rank{rank}.pt'))
        dist.barrier()                       # no rank tears the group down while its peer is still communicating
    finally:
        dist.destroy_process_group()


def test_losses_two_ranks_match_single_process(tmp_path):
    t0 = time.time()
    mp.spawn(_worker, args=(str(tmp_path/'init'), str(tmp_path)), nprocs=W, join=True)
    res = [torch.load(tmp_path/f'rank{r}.pt', weights_only=True) for r in range(W)]
    ref = {}
    _losses(None, ref)
    tol = dict(atol=1e-6, rtol=1e-5)
    for name in ('clip_local', 'clip_full', 'siglip'):
        r = ref[name]
        if name == 'clip_full': losses = [res[k][name]['loss'] for k in range(W)]       # each rank: the full loss
        else: losses = [torch.stack([res[k][name]['loss'] for k in range(W)]).mean()]    # mean over ranks
        for v in losses: assert torch.allclose(v, r['loss'], **tol), (name, v, r['loss'])
        for k in range(W):
            sl = slice(k * B, (k + 1) * B)
            assert torch.allclose(res[k][name]['g_img'] / W, r['g_img'][sl], **tol), name
            assert torch.allclose(res[k][name]['g_txt'] / W, r['g_txt'][sl], **tol), name
            assert torch.allclose(res[k][name]['g_proj'], r['g_proj'], **tol), name
    for k in range(W):
        for name in ('dino_center', 'ibot_center'): assert torch.allclose(res[k][name], ref[name], **tol), name
        assert torch.allclose(res[k]['gather'], ref['gather'])
    assert torch.allclose(torch.cat([res[k]['sinkhorn'] for k in range(W)]), ref['sinkhorn'], **tol)
    assert time.time() - t0 < 60
