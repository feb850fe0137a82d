"DiT training: exact resume, DDP (2 gloo processes) == 1 process, CLI, NaN stop, config errors, sampling."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
from vtp_nbdev.tokenizer import VTPModel, vtp_config
from vtp_nbdev.latents import LatentDataset
from vtp_nbdev.runs import read_checkpoint
from vtp_nbdev.flow import DiTTrainConfig, DiTTrainer, train_dit, sample_images, sample_latents, step_draws
from vtp_nbdev.dit import load_lightningdit
from conftest import end_process_group

STRIP = ('time_s', 'samples_per_s')


@pytest.fixture
def latents(tiny_latents):
    "The shared tiny tokenizer folder and latents run (conftest)."
    return tiny_latents


def small_cfg(**kw):
    return DiTTrainConfig(**{**dict(steps=6, batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=2), **kw})


def _rows(run):
    return [{k: v for k, v in json.loads(l).items() if k not in STRIP} for l in (run/'metrics.jsonl').read_text().splitlines()]


def _weights(run):
    return {n: load_file(run/'final'/n) for n in ('model.safetensors', 'online.safetensors')}


def test_resume_is_bit_identical(latents, tmp_path):
    _, lat = latents
    cfg = small_cfg(ckpt_log_points=1)                                    # the final state kept as `step-<steps>`
    full = train_dit(cfg, lat, tmp_path/'a', 'cpu', progress=False)
    part = train_dit(cfg, lat, tmp_path/'b', 'cpu', max_steps=3, progress=False)         # interrupted after step 3
    assert not (part/'done.json').exists()
    assert [p.name for p in (part/'checkpoints').glob('last-*')] == ['last-00000003.safetensors']
    train_dit(cfg, lat, tmp_path/'b', 'cpu', progress=False)                            # resumes at step 3
    a, b = _weights(full), _weights(part)
    for n in a:
        assert a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]), n
    assert _rows(full) == _rows(part)
    ta, _ = read_checkpoint(next((full/'checkpoints').glob('step-*')))
    tb, _ = read_checkpoint(next((part/'checkpoints').glob('step-*')))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith(('model.', 'optim.')))


def test_loss_falls_and_flops_counted(latents, tmp_path):
    _, lat = latents
    run = train_dit(small_cfg(steps=24, log_every=8, ckpt_every=24, lr=2e-3), lat, tmp_path, 'cpu', progress=False)
    rows = _rows(run)
    assert rows[-1]['loss'] < rows[0]['loss'], (rows[0]['loss'], rows[-1]['loss'])
    assert rows[-1]["flops"] == 24 * rows[0]['flops_per_step'] > 0
    # counted FLOPs ~ 3 x forward ~ 6 x params x tokens x batch
    m, _ = load_lightningdit(run/'final')
    approx = 6 * sum(p.numel() for p in m.parameters()) * 64 * 8
    assert 0.5 < rows[0]['flops_per_step'] / approx < 2.0


def test_step_draws_are_rank_slices():
    cfg = small_cfg()
    full = step_draws(cfg, 5, 8, (2, 3, 3), 0.1)
    parts = [step_draws(cfg, 5, 8, (2, 3, 3), 0.1, rank=r, world=2) for r in range(2)]
    for k in full:
        assert torch.equal(full[k][0::2], parts[0][k]) and torch.equal(full[k][1::2], parts[1][k]), k


def test_nan_loss_stops_and_keeps_checkpoint(latents, tmp_path, monkeypatch):
    _, lat = latents
    cfg = small_cfg(steps=6, ckpt_every=2)
    run = train_dit(cfg, lat, tmp_path, 'cpu', max_steps=2, progress=False)
    orig, calls = DiTTrainer.loss, {'n': 0}
    def poisoned(self, net, *a, **b):
        loss, terms = orig(self, net, *a, **b)
        calls['n'] += 1
        return (loss * float('nan') if calls['n'] == 3 else loss), terms   # resumed: FLOPs come from the metrics
    monkeypatch.setattr(DiTTrainer, 'loss', poisoned)
    with pytest.raises(FloatingPointError, match='non-finite loss nan at step 4'):
        train_dit(cfg, lat, tmp_path, 'cpu', progress=False)
    t, meta = read_checkpoint(next((run/'checkpoints').glob('last-*')))
    assert meta['step'] == '4' and all(torch.isfinite(v).all() for v in t.values() if v.is_floating_point())


def test_config_errors(latents, tmp_path):
    _, lat = latents
    with pytest.raises(ValueError, match=r"model\['in_channels'\]=8 but the latents"):
        train_dit(small_cfg(model={'in_channels': 8}), lat, tmp_path, 'cpu', progress=False)
    with pytest.raises(ValueError, match='unknown LightningDiT arguments'):
        DiTTrainConfig(model={'widht': 3})
    run = train_dit(small_cfg(steps=2), lat, tmp_path, 'cpu', max_steps=1, progress=False)
    cfgj = json.loads((run/'config.json').read_text()); cfgj['lr'] = 1.0
    (run/'config.json').write_text(json.dumps(cfgj))
    with pytest.raises(RuntimeError, match='differs from this run'):
        train_dit(small_cfg(steps=2), lat, tmp_path, 'cpu', progress=False)


def test_sample_images_batch_invariant(latents, tmp_path):
    tok, lat = latents
    run = train_dit(small_cfg(steps=4), lat, tmp_path, 'cpu', progress=False)
    a, la = sample_images(run, tok, n=6, steps=4, cfg_scale=1.5, cfg_interval=(0.2, 1.0), batch_size=4, device='cpu')
    b, lb = sample_images(run, tok, n=6, steps=4, cfg_scale=1.5, cfg_interval=(0.2, 1.0), batch_size=6, device='cpu')
    assert a.dtype == torch.uint8 and a.shape == (6, 3, 32, 32) and torch.equal(la, torch.arange(6))
    assert (a.int() - b.int()).abs().max() <= 1                                 # same samples, any batching
    m, _ = load_lightningdit(run/'final')
    with pytest.raises(ValueError, match='unknown sampler'): sample_latents(m, 2, num_steps=3, sampler='rk4')


def test_cli(latents, tmp_path):
    _, lat = latents
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    cmd = [sys.executable, '-m', 'vtp_nbdev.flow', '--latents-dir', str(lat), '--runs-dir', str(tmp_path), '--device', 'cpu',
           '--no-progress', '--set', 'steps=2', 'batch=4', 'log_every=1']
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run = Path(out.stdout.strip().splitlines()[-1])
    assert (run/'done.json').exists() and (run/'final'/'model.safetensors').exists()
    bad = subprocess.run(cmd[:-3] + ['stepz=2'], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "unknown DiTTrainConfig keys ['stepz']" in bad.stderr


# ---- DDP: 2 gloo processes (global batch split) == 1 process ------------------------------------------------------
def _worker(rank, world, port, cfg, lat, runs):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train_dit(cfg, lat, runs, 'cpu', progress=False)
    end_process_group()


def test_ddp_two_processes_match_one(latents, tmp_path, spawn_ranks):
    _, lat = latents
    cfg = small_cfg(steps=3, lr=1e-4, ckpt_every=3)
    spawn_ranks(_worker, cfg, lat, tmp_path/'ddp')
    one = train_dit(cfg, lat, tmp_path/'one', 'cpu', progress=False)
    ddp = tmp_path/'ddp'/'dit'/one.name
    assert json.loads((ddp/'done.json').read_text())['world_size'] == 2
    r1, r2 = _rows(one), _rows(ddp)
    for a, b in zip(r1, r2):
        assert abs(a['loss'] - b['loss']) < 1e-5 and a['flops_per_step'] == b['flops_per_step'], (a, b)
    w1, w2 = _weights(one), _weights(ddp)
    for n in w1:
        for k in w1[n]:
            assert torch.allclose(w1[n][k], w2[n][k], atol=2e-5, rtol=1e-4), (n, k, (w1[n][k] - w2[n][k]).abs().max())


@pytest.mark.skipif(not (__import__('shutil').which('c++') or __import__('shutil').which('g++')), reason='torch.compile on CPU needs a C++ compiler')
def test_compile_is_an_execution_option(latents, tmp_path):
    "`compile=True` (torch.compile of the training forward, ~1 min here): the eager run's losses, eager checkpoint keys."
    _, lat = latents
    eager = train_dit(small_cfg(steps=3), lat, tmp_path/'e', 'cpu', progress=False)
    comp = train_dit(small_cfg(steps=3, compile=True), lat, tmp_path/'c', 'cpu', progress=False)
    assert 'compile' not in json.loads((eager/'config.json').read_text())            # hash-neutral while off
    assert json.loads((comp/'config.json').read_text())['compile'] is True           # on: its own run (rounding differs)
    for a, b in zip(_rows(eager), _rows(comp)):
        assert abs(a['loss'] - b['loss']) <= 1e-4 * abs(a['loss']), (a, b)
    m, _ = load_lightningdit(comp/'final')                                     # plain (un-prefixed) keys
    w = _weights(comp)['model.safetensors']
    assert not any(k.startswith('_orig_mod') for k in w) and len(w) == len(m.state_dict())
