"""Short pre-training, DiT and T2I runs at smoke settings; `record()` writes their per-step losses and tensor hashes.

Run `python tests/golden/record.py` to (re)write `tests/golden/*.json`; `tests/test_golden.py` re-runs the same and
compares. Hashes are of state-dict tensors (name, dtype, shape, bytes), never of file bytes or run-directory names."""
import hashlib, json, sys, tempfile
from pathlib import Path
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SMALL = dict(vision_depth=2, decoder_depth=1, text_depth=1, dino_out_dim=256, dino_hidden_dim=64, dino_bottleneck_dim=32)
PRETRAIN = dict(preset='tiny', losses='CLIP+SSL+AE', model=SMALL, steps=4, batch_clip=8, batch_ssl=4, batch_rec=2,
                n_local_crops=2, log_every=1, ckpt_every=2, ckpt_log_points=2, dataset='shapes', dataset_kwargs={'size': 40})
DIT = dict(preset='tiny', steps=4, batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=2, ckpt_log_points=1)
T2I = dict(preset='tiny', steps=4, batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=2, ckpt_log_points=1,
           eval_points=2,
           text=dict(width=32, depth=1, heads=2))
STRIP = ('time_s', 'samples_per_s')


def tensor_hashes(sd: dict) -> dict:
    "sha256 of each tensor (dtype, shape and bytes), by name."
    out = {}
    for k in sorted(sd):
        v = sd[k].detach().contiguous().cpu()
        h = hashlib.sha256(f'{v.dtype}{tuple(v.shape)}'.encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        out[k] = h.hexdigest()
    return out


def run_hashes(run: Path) -> dict:
    "Per-step logged values and the tensor hashes of every safetensors file of a run (by path below the run)."
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines() if l.strip()]
    rows = [{k: v for k, v in r.items() if k not in STRIP} for r in rows]
    files = {str(p.relative_to(run)): tensor_hashes(load_file(p)) for p in sorted(run.rglob('*.safetensors'))}
    return dict(rows=rows, files=files)


def golden_runs(tmp: Path) -> dict:
    "The three short runs in `tmp`: {'pretrain': ..., 'dit': ..., 't2i': ...}."
    from vtp_nbdev.pretrain import pretrain
    from vtp_nbdev.tokenizer import VTPModel, vtp_config
    from vtp_nbdev.latents import extract_latents
    from vtp_nbdev.flow import train_dit
    from vtp_nbdev.t2i import train_t2i
    torch.set_num_threads(1)
    out = dict(pretrain=run_hashes(pretrain(PRETRAIN, runs_dir=tmp/'runs', device='cpu', progress=False)))
    torch.manual_seed(0)
    VTPModel(vtp_config('tiny', train_clip=False)).save_pretrained(tmp/'tok')
    lat = extract_latents(tmp/'tok', 'shapes', n=32, dataset_kwargs={'size': 32}, runs_dir=tmp/'runs', shard_size=20,
                          stats_samples=32, progress=False)
    out['dit'] = run_hashes(train_dit(DIT, lat, tmp/'runs', 'cpu', progress=False))
    out['t2i'] = run_hashes(train_t2i(T2I, lat, tmp/'runs', 'cpu', progress=False))
    return out


def record():
    "Write tests/golden/<name>.json for the three runs."
    with tempfile.TemporaryDirectory() as d:
        for name, v in golden_runs(Path(d)).items():
            (HERE/f'{name}.json').write_text(json.dumps(v, indent=1, sort_keys=True) + '\n')


if __name__ == '__main__':
    record()
    sys.exit(0)
