"Pre-training loop: exact resume, DDP equivalence (2 gloo processes), CLI, NaN stop, run-directory safety."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
from vtp_nbdev.pretrain import PretrainConfig, PretrainRecipe, VTPPretrainer, pretrain
from vtp_nbdev.runs import batch_indices, CheckpointError, read_checkpoint
from conftest import end_process_group

SMALL = dict(vision_depth=2, decoder_depth=1, text_depth=1, dino_out_dim=256, dino_hidden_dim=64, dino_bottleneck_dim=32)


def small_cfg(**kw):
    base = dict(model=SMALL, steps=6, batch_clip=8, batch_ssl=4, batch_rec=2, n_local_crops=2, log_every=1, ckpt_every=2,
                dataset_kwargs={'size': 40})
    return PretrainConfig(**{**base, **kw})


def test_resume_is_bit_identical(tmp_path):
    cfg = small_cfg(ckpt_log_points=1)                                    # the final state kept as `step-<steps>`
    full = pretrain(cfg, runs_dir=tmp_path/'a', device='cpu', progress=False)
    part = pretrain(cfg, runs_dir=tmp_path/'b', device='cpu', max_steps=3, progress=False)   # stops after step 3
    assert not (part/'done.json').exists()
    assert sorted(p.name for p in (part/'checkpoints').glob('last-*')) == ['last-00000003.safetensors']
    pretrain(cfg, runs_dir=tmp_path/'b', device='cpu', progress=False)                     # resumes from step 3
    a, b = load_file(full/'final'/'model.safetensors'), load_file(part/'final'/'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(l) for l in (full/'metrics.jsonl').read_text().splitlines()]
    rb = [json.loads(l) for l in (part/'metrics.jsonl').read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ('time_s', 'samples_per_s')} for r in rows]
    assert strip(ra) == strip(rb)
    assert not list((full/'checkpoints').glob('last-*'))                   # a finished run drops its resume state
    ta, _ = read_checkpoint(next((full/'checkpoints').glob('step-*')))
    tb, _ = read_checkpoint(next((part/'checkpoints').glob('step-*')))
    assert all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith(('model.', 'optim.')))  # teacher, centres, moments too


def test_worker_prefetch_is_bit_identical_and_resumes(tmp_path):
    "num_workers=2 prefetches the same batches in the same order, also after a resume from step 3."
    base = pretrain(small_cfg(), runs_dir=tmp_path/'a', device='cpu', progress=False)
    cfg = small_cfg(num_workers=2)
    pretrain(cfg, runs_dir=tmp_path/'b', device='cpu', max_steps=3, progress=False)
    run = pretrain(cfg, runs_dir=tmp_path/'b', device='cpu', progress=False)
    a, b = load_file(base/'final'/'model.safetensors'), load_file(run/'final'/'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda r: [json.loads(l)['loss'] for l in (r/'metrics.jsonl').read_text().splitlines()]
    assert losses(base) == losses(run) and len(losses(run)) == 6



def _recipe(cfg, rank=0, world=1):
    rec = PretrainRecipe(cfg)
    rec.setup('cpu', rank, world)
    return rec


@pytest.mark.parametrize('static', [False, True])
def test_worker_batches_carry_the_masks_ssl_inputs_draws(static):
    "Batches collated by 2 workers carry the iBOT masks (static: the padded indices) that `ssl_inputs` would draw."
    cfg = small_cfg(num_workers=2, mask_prob=1.0, compile='step' if static else False)
    rec, tr = _recipe(cfg), VTPPretrainer(cfg)
    for step, batch in zip(range(2, 5), rec.batches(2, 5)):
        assert (batch['masks'].padded is not None) == static and batch['masks'].masks.device.type == 'cpu'
        images = batch['image'][:cfg.ssl_rows(8)]
        got, ref = tr.ssl_inputs(images, step, batch['masks']), tr.ssl_inputs(images, step)
        assert got.keys() == ref.keys() and ('idx' in got) == static
        for k in got:
            a, b = (got[k], ref[k]) if k != 'loc' else (torch.cat(got[k]), torch.cat(ref[k]))
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), (step, k)


def test_collated_masks_of_two_ranks_are_the_rows_of_one_process():
    "Each rank's collated masks are its global rows (r::2) of the one-process masks: keyed by the global row."
    cfg = small_cfg(mask_prob=1.0)
    one = _recipe(cfg).batch(3)['masks'].masks                                          # (2 * 4, N)
    for r in range(2):
        part = _recipe(cfg, r, 2).batch(3)['masks'].masks                              # (2 * 2, N)
        assert torch.equal(part.view(2, 2, -1), one.view(2, 4, -1)[:, r::2])


def test_losses_fall_on_shapes(tmp_path):
    run = pretrain(small_cfg(steps=30, log_every=5, ckpt_every=30, lr=2e-3, warmup=0.1), runs_dir=tmp_path, device='cpu', progress=False)
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    for k in ('rec', 'clip'):
        assert rows[-1][k] < rows[0][k], (k, rows[0][k], rows[-1][k])
    assert rows[-1]['flops'] == 30 * rows[0]['flops_per_step'] > 0


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    cfg = small_cfg(steps=4, ckpt_every=1)
    run = pretrain(cfg, runs_dir=tmp_path, device='cpu', max_steps=2, progress=False)
    ck = run/'checkpoints'
    good = next(ck.glob('last-*'))
    bad = ck/'last-00000009.safetensors'; bad.write_bytes(good.read_bytes()[:100])          # a truncated "newer" file
    with pytest.raises(CheckpointError, match='last-00000009.safetensors: unreadable or truncated'):
        read_checkpoint(bad)
    pretrain(cfg, runs_dir=tmp_path, device='cpu', progress=False)
    assert (run/'done.json').exists()


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg(steps=6, ckpt_every=2)
    run = pretrain(cfg, runs_dir=tmp_path, device='cpu', max_steps=2, progress=False)
    orig = VTPPretrainer.forward
    def poisoned(self, batch, step):
        loss, terms = orig(self, batch, step)
        return loss * float('nan') if step == 3 else loss, terms
    monkeypatch.setattr(VTPPretrainer, 'forward', poisoned)
    with pytest.raises(FloatingPointError, match='non-finite loss nan at step 3'):
        pretrain(cfg, runs_dir=tmp_path, device='cpu', progress=False)
    tensors, meta = read_checkpoint(next((run/'checkpoints').glob('last-*')))
    assert meta['step'] == '2' and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_run_dir_with_other_config_is_refused(tmp_path):
    cfg = small_cfg(steps=2)
    run = pretrain(cfg, runs_dir=tmp_path, device='cpu', max_steps=1, progress=False)
    (run/'config.json').write_text(json.dumps({**cfg.to_dict(), 'lr': 1.0}))
    with pytest.raises(RuntimeError, match='differs from this run'):
        pretrain(cfg, runs_dir=tmp_path, device='cpu', progress=False)



def test_grad_clip_zero_trains_and_positive_clips(tmp_path, monkeypatch):
    "grad_clip=0 means no clipping (the parameters move); a positive limit still bounds the gradient norm."
    seen, orig = [], torch.nn.utils.clip_grad_norm_
    def spy(params, max_norm, *a, **k):
        params = [p for p in params if p.grad is not None]
        total = orig(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        seen.append((max_norm, total.item(), after.item()))
        return total
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', spy)
    from vtp_nbdev.config import seed_everything
    cfg = small_cfg(losses='AE', batch_rec=8, steps=2, grad_clip=0., weight_decay=0.)   # changes come from gradients
    seed_everything(cfg.seed)
    start = VTPPretrainer(cfg).model.state_dict()
    end = load_file(pretrain(cfg, runs_dir=tmp_path, device='cpu', progress=False)/'final'/'model.safetensors')
    tuned = ('pixel_decoder.proj_out.weight', 'pixel_decoder.proj_out.bias')
    moved = [k for k in tuned if not torch.equal(start[k], end[k])]
    assert len(moved) == 2, moved
    assert [m for m, _, _ in seen] == [float('inf')] * 2 and all(after > 0 for _, _, after in seen)
    seen.clear()
    clipped = small_cfg(losses='AE', batch_rec=8, steps=2, grad_clip=1e-3)
    pretrain(clipped, runs_dir=tmp_path, device='cpu', progress=False)
    assert [m for m, _, _ in seen] == [1e-3] * 2
    assert all(total > 1e-3 and after == pytest.approx(1e-3, rel=1e-3) for _, total, after in seen), seen
    assert PretrainRecipe(small_cfg(grad_clip=0.)).grad_clip == float('inf')


def test_weight_decay_skips_vectors_and_learned_tokens():
    "AdamW decays the matrices only: no decay on 1-D parameters, the CLS and mask tokens and the token embedding."
    from vtp_nbdev.pretrain import make_optimizer
    tr = VTPPretrainer(small_cfg())
    decay, no_decay = (set(map(id, g['params'])) for g in make_optimizer(tr, tr.cfg).param_groups)
    names = {id(p): n for n, p in tr.named_parameters()}
    exempt_matrices = sorted(names[i] for i in no_decay if dict(tr.named_parameters())[names[i]].ndim >= 2)
    assert exempt_matrices == ['net.model.token_embedding.weight', 'net.model.trunk.cls_token',
                               'net.model.trunk.mask_token']
    assert all(dict(tr.named_parameters())[names[i]].ndim >= 2 for i in decay)
    assert 'net.model.positional_embedding' in {names[i] for i in decay}
    assert len(decay) + len(no_decay) == sum(p.requires_grad for p in tr.parameters())

def test_config_errors():
    with pytest.raises(ValueError, match='unknown PretrainConfig keys'): PretrainConfig.from_dict({'batch': 3})
    with pytest.raises(ValueError, match='steps=0'): PretrainConfig(steps=0)
    with pytest.raises(ValueError, match='not divisible by the number of heads|divisible'):
        PretrainConfig(model={'vision_embed_dim': 65})


def test_cli(tmp_path):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    cmd = [sys.executable, '-m', 'vtp_nbdev.pretrain', '--runs-dir', str(tmp_path), '--device', 'cpu', '--no-progress', '--set',
           'steps=2', 'losses=AE', 'batch_clip=4', 'batch_rec=4', 'log_every=1', f'model={json.dumps(SMALL)}', 'dataset_kwargs={"size": 8}']
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run = Path(out.stdout.strip().splitlines()[-1])
    assert (run/'final'/'config.json').exists() and (run/'done.json').exists()
    bad = subprocess.run(cmd[:cmd.index('--set') + 1] + ['stepz=2'], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "unknown PretrainConfig keys ['stepz']" in bad.stderr


# ---- a checkpoint written by 2 gloo ranks resumes on 1 process and back --------------------------------------------
def _pretrain_worker(rank, world, port, cfg, runs, max_steps):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    pretrain(cfg, runs_dir=runs, device='cpu', max_steps=max_steps, progress=False)
    end_process_group()


def test_checkpoint_from_two_ranks_resumes_on_one_and_back(tmp_path, spawn_ranks):
    cfg = small_cfg(steps=6, ckpt_every=2)
    one = pretrain(cfg, runs_dir=tmp_path/'one', device='cpu', progress=False)
    spawn_ranks(_pretrain_worker, cfg, tmp_path/'mixed', 2)
    run = pretrain(cfg, runs_dir=tmp_path/'mixed', device='cpu', max_steps=4, progress=False)   # 2 ranks -> 1
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    spawn_ranks(_pretrain_worker, cfg, tmp_path/'mixed', None)
    assert (run/'done.json').exists() and json.loads((run/'done.json').read_text())['world_size'] == 2   # 1 -> 2 ranks
    # same math, different reduction order: the loss curves agree (Adam amplifies the last bits of near-zero gradients,
    # e.g. the attention key bias, so individual weights are not compared)
    ref = [json.loads(l) for l in (one/'metrics.jsonl').read_text().splitlines()]
    got = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in got] == [r['step'] for r in ref] == list(range(1, 7))
    for r, g in zip(ref, got):
        for k in ('loss', 'clip', 'dino', 'ibot', 'rec'): assert g[k] == pytest.approx(r[k], rel=2e-3, abs=1e-4), (r['step'], k)


@pytest.mark.skipif(not (__import__('shutil').which('c++') or __import__('shutil').which('g++')), reason='torch.compile on CPU needs a C++ compiler')
def test_compile_keeps_losses_and_checkpoint_keys(tmp_path):
    "`compile=True` compiles each block (~1 min here): losses as eager within float rounding, same checkpoint keys."
    eager = pretrain(small_cfg(steps=2, losses='AE'), runs_dir=tmp_path/'e', device='cpu', progress=False)
    comp = pretrain(small_cfg(steps=2, losses='AE', compile=True), runs_dir=tmp_path/'c', device='cpu', progress=False)
    rows = lambda r: [json.loads(l)['loss'] for l in (r/'metrics.jsonl').read_text().splitlines()]
    assert rows(eager) == pytest.approx(rows(comp), rel=1e-4) and len(rows(comp)) == 2
    assert load_file(eager/'final'/'model.safetensors').keys() == load_file(comp/'final'/'model.safetensors').keys()


@pytest.mark.parametrize('accum', [1, 2])
def test_bf16_on_cpu_trains_close_to_fp32(tmp_path, accum):
    "precision='bf16' runs the forward passes under CPU bf16 autocast: finite losses near the fp32 run's."
    rows = {}
    for p in ('fp32', 'bf16'):
        run = pretrain(small_cfg(steps=4, precision=p, grad_accum=accum), runs_dir=tmp_path/p, device='cpu',
                       progress=False)
        rows[p] = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines() if '"loss"' in l]
    assert len(rows['bf16']) == 4 and rows['fp32'] != rows['bf16']        # bf16 did change the arithmetic
    for a, b in zip(rows['fp32'], rows['bf16']):
        for k in ('loss', 'clip', 'dino', 'ibot', 'rec'):
            assert torch.isfinite(torch.tensor(b[k])), (k, b)
            assert abs(a[k] - b[k]) <= 0.02 * abs(a[k]) + 0.01, (k, a[k], b[k])
    assert small_cfg(precision='bf16').to_dict() != small_cfg().to_dict()
