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
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != 'time_s'} for l in (p/'metrics.jsonl').read_text().splitlines()]
    assert strip(run) == strip(ref_run)
    assert not list((run/'checkpoints').glob('*.tmp'))                # no temp file is ever taken for a checkpoint


def test_truncated_checkpoint_is_named_and_skipped(tmp_path):
    from vtp_nbdev.pretrain import latest_checkpoint, atomic_save, CheckpointError, read_checkpoint
    good = atomic_save({'x': torch.ones(3)}, tmp_path/'last-00000001.safetensors', {'format': 'vtp_nbdev.pretrain.v1', 'step': '1'})
    newer = tmp_path/'last-00000002.safetensors'; newer.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match='last-00000002.safetensors'): read_checkpoint(newer)
    assert latest_checkpoint(tmp_path) == good
    (tmp_path/'last-00000003.safetensors').write_bytes(b'')
    assert latest_checkpoint(tmp_path) == good

