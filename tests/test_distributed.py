"Scale-out: gradient accumulation == the full batch (tokenizer, DiT; 2 gloo ranks too), hash-neutral new fields, sharded streaming, benchmark CLI."
import io, json, os, subprocess, sys, tarfile
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from vtp_nbdev.config import config_hash
from vtp_nbdev.pretrain import PretrainConfig, VTPPretrainer, pretrain, accumulate_grads
from vtp_nbdev.runs import batch_indices
from vtp_nbdev.flow import DiTTrainConfig, train_dit
from vtp_nbdev.data import ShapesDataset, TarShardDataset, ShardedStream
from conftest import end_process_group

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vision_depth=2, decoder_depth=1, text_depth=1, dino_out_dim=256, dino_hidden_dim=64, dino_bottleneck_dim=32)


def small_cfg(**kw):
    base = dict(model=SMALL, steps=3, batch_clip=8, batch_ssl=4, batch_rec=4, n_local_crops=2, log_every=1, ckpt_every=3,
                dataset_kwargs={'size': 40})
    return PretrainConfig(**{**base, **kw})


def _rows(run):
    return [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]


def test_new_fields_leave_existing_hashes_alone():
    # the committed results store names its records by these hashes: a new execution option must not change them
    from vtp_nbdev.scaling import point_key
    assert config_hash(point_key(PretrainConfig(), 1, 'smoke')['pretrain']) == '63b13edf54de'
    assert 'num_workers' not in PretrainConfig().to_dict()                   # the tokenizer run: not hashed while 0
    assert config_hash(DiTTrainConfig().to_dict()) == '94fd705024f9'
    assert 'grad_accum' not in PretrainConfig().to_dict() and PretrainConfig(grad_accum=2).to_dict()['grad_accum'] == 2
    assert config_hash(DiTTrainConfig(grad_accum=2).to_dict()) != config_hash(DiTTrainConfig().to_dict())
    assert 'precision' not in PretrainConfig().to_dict()                     # fp32: not hashed
    assert PretrainConfig(precision='auto').to_dict()['precision'] == 'auto'  # other choices: hashed apart


@pytest.mark.parametrize('losses', ['AE', 'CLIP+SSL+AE'])
def test_pretrain_grad_accum_matches_full_batch(tmp_path, losses):
    kw = dict(losses=losses, batch_rec=8) if losses == 'AE' else dict(losses=losses)
    one = pretrain(small_cfg(**kw), runs_dir=tmp_path, device='cpu', progress=False)
    two = pretrain(small_cfg(**kw, grad_accum=2), runs_dir=tmp_path, device='cpu', progress=False)
    assert one != two and json.loads((two/'config.json').read_text())['grad_accum'] == 2
    ref, got = _rows(one), _rows(two)
    assert ref[0]['loss'] == pytest.approx(got[0]['loss'], rel=1e-6)               # same weights, same batch
    for r, g in zip(ref, got):
        for k in ('loss', 'rec', 'clip', 'dino', 'ibot', 'grad_norm'):
            if k in r: assert g[k] == pytest.approx(r[k], rel=1e-3, abs=1e-5), (r['step'], k)


def test_dit_grad_accum_matches_full_batch(tiny_latents, tmp_path):
    _, lat = tiny_latents
    cfg = dict(steps=3, batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=3)
    ref = _rows(train_dit(DiTTrainConfig(**cfg), lat, tmp_path, device='cpu', progress=False))
    got = _rows(train_dit(DiTTrainConfig(**cfg, grad_accum=4), lat, tmp_path, device='cpu', progress=False))
    for r, g in zip(ref, got):
        for k in ('loss', 'mse', 'cos', 'grad_norm'): assert g[k] == pytest.approx(r[k], rel=1e-4), (r['step'], k)
    with pytest.raises(ValueError, match='not divisible by grad_accum=3'): DiTTrainConfig(**cfg, grad_accum=3)


# ---- 2 gloo ranks x 2 micro-batches == 1 process on the whole batch (CLIP features cached across micro-batches) -----
def _grads(cfg, batch, k=1, world=1):
    torch.manual_seed(0)
    tr = VTPPretrainer(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(tr, find_unused_parameters=True, broadcast_buffers=False) if world > 1 else tr
    if k == 1:
        loss, _ = ddp(batch, 5)
        loss.backward()
    else:
        loss, _ = accumulate_grads(tr, batch, 5, k, ddp)
    grads = {n: p.grad.clone() for n, p in tr.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {n: v.clone() for n, v in tr.state_dict().items() if 'center' in n}


def _worker(rank, world, port, cfg, batch, out, k):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)                      # two processes on two cores: no oversubscription
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    loss, grads, centres = _grads(cfg, {n: v[rank::world] for n, v in batch.items()}, k=k, world=world)
    losses = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses, loss)
    if rank == 0:
        torch.save(dict(loss=torch.stack(losses).mean(), grads=grads, centres=centres), out)
    end_process_group()


@pytest.mark.parametrize('k', [1, 2])
def test_two_ranks_match_one_process(tmp_path, spawn_ranks, k):
    "DDP over 2 gloo processes (k = 2: with gradient accumulation) == 1 process on the whole batch."
    cfg = small_cfg(batch_clip=8, batch_ssl=4, batch_rec=4)
    ds = ShapesDataset(size=16, context_length=32)
    batch = torch.utils.data.default_collate([ds[i] for i in batch_indices(0, 8, 16)])
    batch = {n: v for n, v in batch.items() if torch.is_tensor(v)}
    out = tmp_path/'rank0.pt'
    spawn_ranks(_worker, cfg, batch, out, k)
    got = torch.load(out, weights_only=True)
    loss, grads, centres = _grads(cfg, batch)
    assert torch.allclose(got['loss'], loss, atol=1e-5), (got['loss'], loss)
    assert grads.keys() == got['grads'].keys() and len(grads) > 20
    for n in grads:
        assert torch.allclose(got['grads'][n], grads[n], atol=2e-5, rtol=1e-3), n
    for n in centres:
        assert torch.allclose(got['centres'][n], centres[n], atol=1e-6), n


# ---- sharded streaming: 2 ranks x 2 DataLoader workers read every sample exactly once per epoch ----------------------
def _shards(d, sizes):
    buf = io.BytesIO(); Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, 'PNG')
    paths, n = [], 0
    for s, size in enumerate(sizes):
        p = d/f'shard-{s:03d}.tar'
        with tarfile.open(p, 'w') as tf:
            for _ in range(size):
                for name, data in ((f'{n:05d}.png', buf.getvalue()), (f'{n:05d}.txt', f'sample {n}'.encode())):
                    ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
                n += 1
        paths.append(p)
    return paths, n


@pytest.mark.parametrize('by', ['sample', 'shard'])
def test_sharded_stream_two_ranks_two_workers_cover_each_sample_once(tmp_path, by):
    paths, n = _shards(tmp_path, [7, 5, 6, 4, 3])                              # 25 samples, uneven shards
    ds = TarShardDataset(paths, res=8, context_length=8)
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            st = ShardedStream(ds, rank, 2, seed=3, by=by); st.set_epoch(epoch)
            dl = torch.utils.data.DataLoader(st, batch_size=4, num_workers=2)
            seen += [c for b in dl for c in b['caption']]
        assert sorted(seen) == sorted(f'sample {i}' for i in range(n)), epoch   # each exactly once, no duplicates


# ---- the benchmark script ------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only refusal')
def test_benchmark_refuses_cuda_without_a_gpu():
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'bench.py'), '--device', 'cuda'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'sees no CUDA device' in r.stderr, r.stderr


def test_benchmark_quick_run_writes_report(tmp_path):
    out = tmp_path/'b.md'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'bench.py'), '--quick', '--no-peers', '--out', str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    for s in ('fp32 matmul peak', 'timm ViT-Ti/4 train step', 'VTP-tiny CLIP+SSL+AE step', 'VTP-tiny AE step', 'LightningDiT-tiny train step',
              'Euler steps', '## vs targets'):
        assert s in text, s


def test_host_scan_quick_run_writes_report(tmp_path):
    out = tmp_path/'h.md'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'bench.py'), '--host-scan', '--quick', '--out', str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    for s in ('Host CPU:', 'amx_bf16', '| world | local batch_clip |', '| 64 | 4 | 2 |', 'extrapolated'):
        assert s in text, s


def _uncached_indices(step, batch, n, seed):
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = perm[off:off + batch - len(out)].tolist()
        out += take
        pos += len(take)
    return out


@pytest.mark.parametrize('world', [1, 2, 4])
def test_cached_batch_indices_equal_the_per_step_permutation(world):
    "Indices from the per-epoch cached permutation == a permutation drawn every step, across epoch boundaries."
    for n, batch, seed in ((37, 8, 0), (100, 12, 3), (16, 16, 1)):
        for step in range(3 * n // batch + 2):
            want = _uncached_indices(step, batch, n, seed)
            for rank in range(world):
                assert batch_indices(step, batch, n, seed, rank, world) == want[rank::world], (n, batch, step, rank)


def test_width_scan_table_and_local_peaks():
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import bench
    b = bench.Bench(torch.device('cpu'), peak=1e3, iters=1, compile=False)        # CPU: each row against the peaks around it
    b.record('x', 'x', 1, 1e9, 1.0, 1.)
    assert b.local_peak and len(b.peaks) == 2 and b.rows['x']['peak'] == max(b.peaks) > 1e3
    assert b.rows['x']['mfu'] == pytest.approx(1e9 / max(b.peaks))
    b = bench.Bench(torch.device('cpu'), peak=100e9, iters=1, compile=False, local_peak=False)
    b.peak0 = 100e9
    b.record('tok/S/CLIP+SSL+AE', 'VTP-S', 64, 40e9, 1.0, 1.)
    b.record('tok/S/CLIP+SSL+AE/compiled', 'VTP-S compiled', 64, 40e9, 0.8, 1.)
    b.record('ref/vit_ti4', 'timm ViT-Ti/4 train step', 64, 60e9, 1.0, 1.)
    b.peak = 200e9                                                 # as `finish_peak` after a faster second measurement
    for r in b.rows.values(): r['mfu'] = r['gflops'] * 1e9 / b.peak
    text = '\n'.join(bench.width_scan_table(b, [('VTP-S CLIP+SSL+AE step', 96, '3 x 32', 'tok/S/CLIP+SSL+AE')]))
    assert '| VTP-S CLIP+SSL+AE step | 96 | 3 x 32 | 20.0% | 25.0% | 1.25 |' in text, text
    assert 'timm ViT-Ti/4 train step: 30.0% MFU' in text, text


def test_gpu_profile_dry_run_on_cpu():
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'gpu_profile.py'), '--device', 'cpu', '--preset', 'tiny', '--batch', '8', '--iters', '1'],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    for s in ('VTP-tiny CLIP+SSL+AE step, batch 8', '- ssl_student', '- backward', 'top operators by CPU time', '| 8 | no |'):
        assert s in r.stdout, s


def test_repro_cost_sums_runs_once_and_floors_at_peak(tmp_path):
    "Two points of one tokenizer run count its time once; t2i and DiT proxy runs are read from their logs."
    import json
    res, runs = tmp_path/'results'/'cpu', tmp_path/'runs'
    (res/'t2i').mkdir(parents=True)
    proxy = dict(preset='S', steps=800, batch=64)
    for i, step in enumerate((100, 200)):
        (res/f'p{i}.json').write_text(json.dumps(dict(config_hash='tok1', seconds=dict(evaluate=10., generation=200.), dit_proxy=proxy)))
    (res/'t2i'/'q.json').write_text(json.dumps(dict(config_hash='tok2', seconds=dict(latents_and_training=300., sampling_and_metrics=60.), t2i_flops=3.6e15)))
    for h, t, f in (('tok1', 3600., 7.2e14), ('tok2', 1800., 3.6e14)):
        (runs/'tokenizer'/h).mkdir(parents=True); (runs/'tokenizer'/h/'metrics.jsonl').write_text(json.dumps(dict(time_s=t / 2)) + '\n' + json.dumps(dict(time_s=t, flops=f)) + '\n')
    for d, cfg in (('d1', proxy), ('d2', dict(preset='tiny', steps=10, batch=8))):           # d2: not the proxy
        (runs/'dit'/d).mkdir(parents=True); (runs/'dit'/d/'config.json').write_text(json.dumps(cfg)); (runs/'dit'/d/'done.json').write_text('{}')
        (runs/'dit'/d/'metrics.jsonl').write_text(json.dumps(dict(time_s=150., flops=1e13)) + '\n')
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'repro_cost.py'), '--root', str(tmp_path), '--peak-gflops', '100', '--out', 'cost.md'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = (tmp_path/'cost.md').read_text()
    assert '| tokenizer pre-training | 2 | 1.50 | ' in text                     # tok1 once (1 h) + tok2 (0.5 h)
    assert '| 1080 | 200 | 3.00 |' in text                                   # 1.08e15 FLOPs in 5400 s; at 100 GFLOP/s: 3 h
    assert '| text-to-image point | 1 | 0.10 |' in text and '| DiT proxy training (inside the generation points) | 1 |' in text
    assert '**total** | | **1.72**' in text                                 # 1.5 h + 20 s + 400 s + 360 s
    assert 'take 26.06 h at 50% of the peak' in text and 'took 0.09 h as logged: **26.15 h**' in text   # 4.69e15 FLOPs at 50 GFLOP/s; 20 + 400 - 150 + 60 s
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'repro_cost.py'), '--root', str(tmp_path), '--scale', 'paper'], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and 'no committed points' in r.stderr


def test_repro_cost_counts_a_branched_run_from_its_start():
    "A run started from a shared wsd stable phase logs cumulative FLOPs: only its own steps count."
    import importlib.util
    spec = importlib.util.spec_from_file_location('repro_cost', ROOT/'benchmarks'/'repro_cost.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    row = lambda step: dict(step=step, flops=5. * step, flops_per_step=5.)
    assert m.own_flops([row(1020), row(1040), row(2000)]) == 5. * (2000 - 1000)      # resumed at step 1000
    assert m.own_flops([row(20), row(40), row(2000)]) == 5. * 2000                      # trained from step 0
    assert m.own_flops([dict(time_s=1., flops=7.)]) == 7.                               # no per-step count logged


# ---- FSDP (FSDP2 over gloo): LightningDiT sharded over 2 ranks == 1 process; its checkpoints resume anywhere --------
def _dit_worker(rank, world, port, cfg, lat, runs, max_steps, fsdp):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    train_dit(cfg, lat, runs, device='cpu', max_steps=max_steps, progress=False, fsdp=fsdp)
    end_process_group()


def test_fsdp_dit_two_ranks_match_one_and_resume(tiny_latents, tmp_path, spawn_ranks):
    _, lat = tiny_latents
    cfg = DiTTrainConfig(steps=4, batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=2)
    one = train_dit(cfg, lat, tmp_path/'one', device='cpu', progress=False)
    spawn_ranks(_dit_worker, cfg, lat, tmp_path/'fsdp', 2, True)
    run = train_dit(cfg, lat, tmp_path/'fsdp', device='cpu', max_steps=3, progress=False)                # FSDP checkpoint -> 1 process
    spawn_ranks(_dit_worker, cfg, lat, tmp_path/'fsdp', None, True)
    assert json.loads((run/'done.json').read_text())['world_size'] == 2                                      # 1 process -> FSDP
    ref, got = _rows(one), _rows(run)
    assert [r['step'] for r in got] == [r['step'] for r in ref] == [1, 2, 3, 4]
    for r, g in zip(ref, got):
        for k in ('loss', 'mse', 'cos', 'grad_norm'): assert g[k] == pytest.approx(r[k], rel=1e-4), (r['step'], k)
    from safetensors.torch import load_file
    a, b = load_file(one/'final'/'model.safetensors'), load_file(run/'final'/'model.safetensors')
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---- FSDP for the tokenizer: student, heads and EMA teacher sharded over 2 ranks == 1 process; checkpoints move ------
def _tok_worker(rank, world, port, cfg, runs, max_steps):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    pretrain(cfg, runs, device='cpu', max_steps=max_steps, progress=False, fsdp=True)
    end_process_group()


@pytest.mark.parametrize('accum', [1, 2])
def test_fsdp_tokenizer_two_ranks_match_one_and_resume(tmp_path, spawn_ranks, accum):
    # CLIP+SSL+AE: scalar logit_scale, teacher, heads; the final state kept as `step-<steps>`
    cfg = small_cfg(steps=4, ckpt_every=2, grad_accum=accum, ckpt_log_points=1)
    one = pretrain(cfg, runs_dir=tmp_path/'one', device='cpu', progress=False)
    spawn_ranks(_tok_worker, cfg, tmp_path/'fsdp', 2)                        # FSDP -> checkpoint at step 2
    run = pretrain(cfg, runs_dir=tmp_path/'fsdp', device='cpu', max_steps=3, progress=False)   # -> 1 process
    spawn_ranks(_tok_worker, cfg, tmp_path/'fsdp', None)                     # 1 process -> FSDP, to the end
    assert json.loads((run/'done.json').read_text())['world_size'] == 2
    ref, got = _rows(one), _rows(run)
    assert [r['step'] for r in got] == [r['step'] for r in ref] == [1, 2, 3, 4]
    for r, g in zip(ref, got):
        for k in ('loss', 'rec', 'clip', 'dino', 'ibot', 'grad_norm', 'logit_scale'):
            assert g[k] == pytest.approx(r[k], rel=1e-4, abs=1e-6), (r['step'], k)
    from safetensors.torch import load_file
    a, b = load_file(one/'final'/'model.safetensors'), load_file(run/'final'/'model.safetensors')
    assert a.keys() == b.keys() and b['logit_scale'].shape == a['logit_scale'].shape == ()
    for k in a:                     # the key bias has a zero gradient (softmax ignores it): Adam steps on rounding noise
        if k.endswith('in_proj_bias'): E = a[k].numel() // 3; a[k][E:2 * E] = b[k][E:2 * E]
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    last = sorted((run/'checkpoints').glob('step-*'))[-1]                    # FSDP checkpoints: DDP's format and shapes
    ta, tb = load_file(sorted((one/'checkpoints').glob('step-*'))[-1]), load_file(last)
    assert ta.keys() == tb.keys() and all(ta[k].shape == tb[k].shape for k in ta)


# ---- the deferred NaN check (CUDA's path: no host sync per step), exercised on CPU ---------------------------------
def test_deferred_nan_check_stops_before_the_next_checkpoint(tmp_path, monkeypatch):
    import vtp_nbdev.runs as R
    cfg = small_cfg(steps=6, ckpt_every=2, log_every=2, losses='AE', batch_rec=8)
    run = pretrain(cfg, runs_dir=tmp_path, device='cpu', max_steps=2, progress=False)
    orig = VTPPretrainer.forward
    def poisoned(self, batch, step, micro=None):
        loss, terms = orig(self, batch, step, micro)
        return loss * float('nan') if step == 2 else loss, terms
    monkeypatch.setattr(VTPPretrainer, 'forward', poisoned)
    monkeypatch.setattr(R, 'defer_finite_check', lambda device: True)
    with pytest.raises(FloatingPointError, match='non-finite loss at step 2 \\(checked at step 4'):
        pretrain(cfg, runs_dir=tmp_path, device='cpu', progress=False)
    from vtp_nbdev.runs import read_checkpoint
    tensors, meta = read_checkpoint(next((run/'checkpoints').glob('last-*')))
    assert meta['step'] == '2' and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_benchmark_mfu_against_the_gpu_spec_peak():
    sys.path.insert(0, str(ROOT/'benchmarks'))
    import bench
    assert bench.spec_peak('NVIDIA H200') == 989e12
    assert bench.spec_peak('NVIDIA H100 PCIe') == 756e12 and bench.spec_peak('NVIDIA H100 80GB HBM3') == 989e12
    assert bench.spec_peak('NVIDIA A100-SXM4-80GB') == 312e12 and bench.spec_peak('NVIDIA L40S') == 362e12
    assert bench.spec_peak('NVIDIA L4') == 121e12 and bench.spec_peak('Some GPU X1') is None
    b = bench.Bench(torch.device('cpu'), peak=800e12, iters=1, compile=False, local_peak=False)
    b.record('dit/XL', 'DiT-XL/1 step', 64, 494.5e12, 1.0, 1.)
    table = bench.rows_table(b, 'NVIDIA H200')
    assert '989 TFLOP/s' in table[0] and '| MFU (spec) |' in table[2]
    assert table[-1].startswith('| DiT-XL/1 step | 64.0 | 494500.0 | 61.8% | 50.0% |')
    assert '| MFU (spec) |' not in '\n'.join(bench.rows_table(b))
    assert 'No spec peak known' in bench.rows_table(b, 'Some GPU X1')[0]
