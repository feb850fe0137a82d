"Faults: runs killed with SIGKILL at random points (checkpoint writes included) resume to bit-identical results."
import json, os, random, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file

SMALL = dict(vision_depth=1, decoder_depth=1, text_depth=1, dino_out_dim=128, dino_hidden_dim=32, dino_bottleneck_dim=16)
ARGS = ['steps=14', 'batch_clip=8', 'batch_ssl=4', 'batch_rec=4', 'n_local_crops=1', 'log_every=1', 'ckpt_every=1',
        f'model={json.dumps(SMALL)}', 'dataset_kwargs={"size": 24}']


def _cmd(runs):
    return [sys.executable, '-m', 'vtp_nbdev.pretrain', '--runs-dir', str(runs), '--device', 'cpu', '--no-progress', '--set', *ARGS]


def _env():
    return {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}   # same threads in every process: same reductions


def _logged_step(runs):
    "Last step logged by the run under `runs` (0 before any)."
    for f in runs.glob('tokenizer/*/metrics.jsonl'):
        lines = [l for l in f.read_text().splitlines() if l.endswith('}')]
        return json.loads(lines[-1])['step'] if lines else 0
    return 0


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    ref = subprocess.run(_cmd(tmp_path/'ref'), capture_output=True, text=True, env=_env(), timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_run = Path(ref.stdout.strip().splitlines()[-1])
    rng, kills, metrics = random.Random(0), 0, None
    for target in (3, 7, 11, None):                                 # SIGKILL just after these steps (+ random delay), then finish
        p = subprocess.Popen(_cmd(tmp_path/'killed'), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        if target is not None:
            t0 = time.time()
            while p.poll() is None and time.time() - t0 < 600 and _logged_step(tmp_path/'killed') < target: time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.25))                        # lands anywhere: mid-step, mid-checkpoint-write, ...
            if p.poll() is None: p.send_signal(signal.SIGKILL); kills += 1
            p.communicate()
            continue
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert kills >= 2
    run = Path(out.strip().splitlines()[-1])
    assert run.name == ref_run.name                                     # same config, same hash
    a, b = load_file(ref_run/'final'/'model.safetensors'), load_file(run/'final'/'model.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in ('time_s', 'samples_per_s')} for l in (p/'metrics.jsonl').read_text().splitlines()]
    assert strip(run) == strip(ref_run)
    assert not list((run/'checkpoints').glob('*.tmp'))                # no temp file is ever taken for a checkpoint


def test_truncated_checkpoint_is_named_and_skipped(tmp_path):
    from vtp_nbdev.runs import latest_checkpoint, atomic_save, CheckpointError, read_checkpoint
    good = atomic_save({'x': torch.ones(3)}, tmp_path/'last-00000001.safetensors', {'format': 'vtp_nbdev.pretrain.v1', 'step': '1'})
    newer = tmp_path/'last-00000002.safetensors'; newer.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match='last-00000002.safetensors'): read_checkpoint(newer)
    assert latest_checkpoint(tmp_path) == good
    (tmp_path/'last-00000003.safetensors').write_bytes(b'')
    assert latest_checkpoint(tmp_path) == good



# ---- DiT training killed anywhere (forked child: same process image and thread count, no re-import) -------------------
import errno
import multiprocessing
from vtp_nbdev import io as io_mod
from vtp_nbdev.pretrain import PretrainConfig, VTPPretrainer, pretrain
from vtp_nbdev.runs import read_checkpoint, latest_checkpoint
from vtp_nbdev.tokenizer import VTPModel, vtp_config
from vtp_nbdev.flow import DiTTrainConfig, DiTTrainer, train_dit

STRIP = ('time_s', 'samples_per_s')


@pytest.fixture
def dit_latents(tiny_latents):
    "The shared tiny latents run (conftest)."
    return tiny_latents[1]


@pytest.fixture
def one_thread():
    "One intra-op thread here and in forked children (a forked OpenMP pool is unusable; same reductions everywhere)."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rows(run, strip=STRIP):
    return [{k: v for k, v in json.loads(l).items() if k not in strip} for l in (run/'metrics.jsonl').read_text().splitlines()]


def _same_files(a, b):
    "Tensors of two safetensors files are bit-identical (same keys)."
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _last_step(metrics):
    "Last step logged in a metrics.jsonl (0 before any; a half-written last line is ignored)."
    if not metrics.exists(): return 0
    lines = [l for l in metrics.read_text().splitlines() if l.endswith('}')]
    return json.loads(lines[-1])['step'] if lines else 0


def _dit_child(cfg, lat, runs):
    torch.set_num_threads(1)
    train_dit(cfg, lat, runs, 'cpu', progress=False)


def test_dit_sigkill_anywhere_then_resume_is_bit_identical(dit_latents, tmp_path, one_thread):
    cfg = DiTTrainConfig(steps=36, batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=1, ckpt_log_points=1,
                         model={'depth': 2})
    ref = train_dit(cfg, dit_latents, tmp_path/'ref', 'cpu', progress=False)
    run = ref.parent.parent.parent/'killed'/'dit'/ref.name                   # same config + latents: same hash
    rng, kills, ctx = random.Random(0), 0, multiprocessing.get_context('fork')
    for target in sorted(rng.sample(range(2, 33), 3)):                    # SIGKILL just after these steps (+ random delay)
        p = ctx.Process(target=_dit_child, args=(cfg, dit_latents, tmp_path/'killed')); p.start()
        t0 = time.time()
        while p.is_alive() and time.time() - t0 < 120 and _last_step(run/'metrics.jsonl') < target: time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.06))                                   # lands anywhere: mid-step, mid-checkpoint-write, ...
        if p.is_alive(): os.kill(p.pid, signal.SIGKILL); kills += 1
        p.join(60)
        assert p.exitcode in (0, -signal.SIGKILL), p.exitcode
    assert kills >= 2
    assert train_dit(cfg, dit_latents, tmp_path/'killed', 'cpu', progress=False) == run   # resumes from the last good checkpoint
    for n in ('model.safetensors', 'online.safetensors'): assert _same_files(ref/'final'/n, run/'final'/n), n
    assert _rows(run) == _rows(ref)
    ta, _ = read_checkpoint(next((ref/'checkpoints').glob('step-*')))
    tb, _ = read_checkpoint(next((run/'checkpoints').glob('step-*')))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith(('model.', 'optim.')))
    assert not [p for p in (run/'checkpoints').iterdir() if p.name.endswith('.tmp')]


# ---- run directories that cannot be written -------------------------------------------------------------------------
PT_SMALL = dict(vision_depth=1, decoder_depth=1, text_depth=1, dino_out_dim=128, dino_hidden_dim=32, dino_bottleneck_dim=16)


def pt_cfg(**kw):
    return PretrainConfig(**{**dict(model=PT_SMALL, steps=4, batch_clip=8, batch_ssl=4, batch_rec=4, n_local_crops=1,
                                    log_every=1, ckpt_every=1, dataset_kwargs={'size': 24}), **kw})


def dit_cfg(**kw):
    return DiTTrainConfig(**{**dict(steps=4, batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=1, model={'depth': 1}), **kw})


@pytest.fixture
def no_training(monkeypatch):
    "Any model construction fails the test: errors must come before training work starts."
    def boom(*a, **k): raise AssertionError('training work started before the run directory was checked')
    monkeypatch.setattr(VTPPretrainer, '__init__', boom)
    monkeypatch.setattr(DiTTrainer, '__init__', boom)


def _start(kind, runs, lat):
    return pretrain(pt_cfg(), runs_dir=runs, device='cpu', progress=False) if kind == 'pretrain' else \
        train_dit(dit_cfg(), lat, runs, 'cpu', progress=False)


@pytest.mark.parametrize('kind', ['pretrain', 'dit'])
def test_read_only_runs_dir_real_chmod(kind, dit_latents, tmp_path, no_training):
    ro = tmp_path/'ro'; ro.mkdir(); ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK): pytest.skip('chmod 0o555 does not stop this user (root): see the simulated variant')
        with pytest.raises(PermissionError, match=str(ro)): _start(kind, ro, dit_latents)
    finally: ro.chmod(0o755)


def _deny_writes_under(monkeypatch, root):
    "os.access reports every path under `root` as not writable (what a read-only mount or chmod does to a non-root user)."
    real, root = os.access, Path(root).resolve()
    def access(path, mode, *a, **k):
        p = Path(path).resolve()
        if mode & os.W_OK and (p == root or root in p.parents): return False
        return real(path, mode, *a, **k)
    monkeypatch.setattr(os, 'access', access)


@pytest.mark.parametrize('kind', ['pretrain', 'dit'])
def test_unwritable_runs_dir_simulated_is_refused_before_training(kind, dit_latents, tmp_path, monkeypatch, no_training):
    _deny_writes_under(monkeypatch, tmp_path/'ro')
    with pytest.raises(PermissionError, match=rf"run directory {tmp_path/'ro'}/\S+ is not writable"):
        _start(kind, tmp_path/'ro', dit_latents)
    assert not list((tmp_path/'ro').rglob('config.json'))                      # nothing claimed the run


@pytest.mark.parametrize('kind', ['pretrain', 'dit'])
def test_runs_dir_that_is_a_file_is_named(kind, dit_latents, tmp_path, no_training):
    f = tmp_path/'runs'; f.write_text('not a folder')
    with pytest.raises(OSError, match=str(f)) as e: _start(kind, f, dit_latents)
    assert isinstance(e.value, (NotADirectoryError, FileExistsError, PermissionError)), repr(e.value)


@pytest.mark.parametrize('kind', ['pretrain', 'dit'])
def test_unwritable_existing_run_dir_is_refused_on_resume(kind, dit_latents, tmp_path, monkeypatch):
    run = pretrain(pt_cfg(), runs_dir=tmp_path, device='cpu', max_steps=1, progress=False) if kind == 'pretrain' else \
        train_dit(dit_cfg(), dit_latents, tmp_path, 'cpu', max_steps=1, progress=False)
    _deny_writes_under(monkeypatch, run)
    def boom(*a, **k): raise AssertionError('training work started before the run directory was checked')
    monkeypatch.setattr(VTPPretrainer, '__init__', boom); monkeypatch.setattr(DiTTrainer, '__init__', boom)
    with pytest.raises(PermissionError, match=str(run)): _start(kind, tmp_path, dit_latents)


# ---- disk full while writing a checkpoint ---------------------------------------------------------------------------
def _disk_full_after(monkeypatch, n_ok):
    "safetensors writes succeed `n_ok` times, then write part of the file and fail with ENOSPC (as a full disk does)."
    real, calls = io_mod.save_file, {'n': 0}
    def save_file(tensors, filename, metadata=None):
        calls['n'] += 1
        if calls['n'] <= n_ok: return real(tensors, filename, metadata=metadata)
        with open(filename, 'wb') as f: f.write(b'\x00' * 200)             # the part that fitted
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(io_mod, 'save_file', save_file)
    return calls


def _train(kind, runs, lat, **kw):
    return pretrain(pt_cfg(), runs_dir=runs, device='cpu', progress=False, **kw) if kind == 'pretrain' else \
        train_dit(dit_cfg(), lat, runs, 'cpu', progress=False, **kw)


@pytest.mark.parametrize('kind', ['pretrain', 'dit'])
def test_disk_full_on_second_checkpoint_keeps_the_first(kind, dit_latents, tmp_path, monkeypatch, one_thread):
    ref = _train(kind, tmp_path/'ref', dit_latents)
    calls = _disk_full_after(monkeypatch, 1)
    with pytest.raises(OSError) as e: _train(kind, tmp_path/'full', dit_latents)
    assert e.value.errno == errno.ENOSPC and calls['n'] == 2
    run = tmp_path/'full'/ref.parent.name/ref.name
    ck = run/'checkpoints'
    assert sorted(p.name for p in ck.iterdir()) == ['last-00000001.safetensors']   # no half-written file, nothing newer
    assert latest_checkpoint(ck) == ck/'last-00000001.safetensors'
    tensors, meta = read_checkpoint(ck/'last-00000001.safetensors')
    assert meta['step'] == '1' and tensors and not (run/'done.json').exists()
    monkeypatch.undo()                                                          # space freed: the run resumes at step 1
    torch.set_num_threads(1)
    assert _train(kind, tmp_path/'full', dit_latents) == run
    strip = STRIP
    assert _rows(run, strip) == _rows(ref, strip)
    assert _same_files(ref/'final'/'model.safetensors', run/'final'/'model.safetensors')


def test_disk_full_error_names_the_checkpoint(tmp_path, monkeypatch):
    _disk_full_after(monkeypatch, 1)
    with pytest.raises(OSError) as e: pretrain(pt_cfg(), runs_dir=tmp_path, device='cpu', progress=False)
    assert e.value.errno == errno.ENOSPC
    assert 'last-00000002.safetensors' in str(e.value) and 'last-00000001.safetensors' in str(e.value)


# ---- determinism: the same config and seed twice ------------------------------------------------------------------
def test_same_config_and_seed_twice_is_identical(tmp_path, one_thread):
    cfg = pt_cfg(steps=5, ckpt_every=5, ckpt_log_points=1)
    a = pretrain(cfg, runs_dir=tmp_path/'a', device='cpu', progress=False)
    b = pretrain(cfg, runs_dir=tmp_path/'b', device='cpu', progress=False)
    ra, rb = _rows(a, STRIP), _rows(b, STRIP)
    assert [r['step'] for r in ra] == [1, 2, 3, 4, 5]
    assert ra == rb                                                             # every logged loss term, bit for bit
    assert _same_files(a/'final'/'model.safetensors', b/'final'/'model.safetensors')
    assert _same_files(next((a/'checkpoints').glob('step-*')), next((b/'checkpoints').glob('step-*')))   # + optimiser, RNG
    c = pretrain(pt_cfg(steps=5, ckpt_every=5, seed=1), runs_dir=tmp_path/'c', device='cpu', progress=False)
    assert _rows(c, STRIP)[0]['loss'] != ra[0]['loss']                    # and the seed matters
