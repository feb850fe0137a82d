"""Short pre-training, DiT and T2I runs at smoke settings; `record()` writes their per-step losses and tensor hashes.

Float kernels differ by CPU kind (vendor, vector ISA, AMX: `vtp_nbdev.config.cpu_kind`), so each kind has its own
recording in `tests/golden/<kind>/`. Run `python tests/golden/record.py` to (re)write this host's kind;
`tests/test_golden.py` re-runs the same and compares: bit for bit against this kind's recording, within a tight
tolerance against another kind's where this kind has none. Hashes are of state-dict tensors (name, dtype, shape,
bytes), never of file bytes or run-directory names; sums beside them serve the tolerance comparison."""
import hashlib, json, math, sys, tempfile
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


def tensor_sums(sd: dict) -> dict:
    "[sum, sum of |x|, sum of x^2] of each floating tensor in float64, by name (integer tensors: exact, via the hash)."
    out = {}
    for k in sorted(sd):
        v = sd[k].detach().cpu()
        if v.is_floating_point():
            v = v.double()
            out[k] = [v.sum().item(), v.abs().sum().item(), (v * v).sum().item()]
    return out


def run_hashes(run: Path) -> dict:
    "Per-step logged values, and the tensor hashes and sums of every safetensors file of a run (by path below it)."
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines() if l.strip()]
    rows = [{k: v for k, v in r.items() if k not in STRIP} for r in rows]
    sds = {str(p.relative_to(run)): load_file(p) for p in sorted(run.rglob('*.safetensors'))}
    files = {f: tensor_hashes(sd) for f, sd in sds.items()}
    sums = {f: tensor_sums(sd) for f, sd in sds.items()}
    return dict(rows=rows, files=files, sums=sums)


# Another CPU kind: logged values of 4 steps differ in the 6th-7th significant digit (RTOL). Tensors are looser
# (TENSOR_RTOL, relative to the tensor's sum of |x|): Adam turns round-off in near-zero gradients (e.g. attention key
# biases) into whole +-lr steps. A real change (a loss term, an update rule, an init) moves both far more.
RTOL, ATOL, TENSOR_RTOL = 1e-4, 1e-6, 1e-2


def close(a: float, b: float, rtol: float = RTOL, atol: float = ATOL) -> bool:
    "Whether two recorded floats agree within the cross-kind tolerance (NaN never does)."
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def sums_close(got: list, want: list) -> bool:
    "Whether a tensor's [sum, sum |x|, sum x^2] agree across CPU kinds (sum within TENSOR_RTOL of sum |x|)."
    scale = [want[1], want[1], want[2]]
    return all(abs(g - w) <= TENSOR_RTOL * s + ATOL for g, w, s in zip(got, want, scale))


def differences(got: dict, want: dict, exact: bool) -> list:
    "What differs between two recordings of one run: bit for bit (`exact`), or within the cross-kind tolerance."
    out = []
    if len(got['rows']) != len(want['rows']):
        return [f"{len(got['rows'])} logged rows, recorded {len(want['rows'])}"]
    for g, w in zip(got['rows'], want['rows']):
        if g.keys() != w.keys():
            out.append(f"step {w.get('step')}: logged names {sorted(g)} != {sorted(w)}")
            continue
        bad = [k for k in w if g[k] != w[k] and (exact or not isinstance(w[k], float) or not close(g[k], w[k]))]
        out += [f"step {w['step']} {k}: {g[k]!r} != recorded {w[k]!r}" for k in bad]
    if sorted(got['files']) != sorted(want['files']):
        return out + [f"checkpoint files {sorted(got['files'])} != recorded {sorted(want['files'])}"]
    for f, hashes in want['files'].items():
        if got['files'][f].keys() != hashes.keys():
            out.append(f"{f}: tensor names differ")
            continue
        sums = {} if exact else want.get('sums', {}).get(f, {})
        for k, h in hashes.items():
            if k in sums:
                if not sums_close(got['sums'][f][k], sums[k]):
                    out.append(f"{f} {k}: sums {got['sums'][f][k]} != recorded {sums[k]}")
            elif got['files'][f][k] != h:
                out.append(f"{f} {k}: tensor bytes differ")
    return out


def kind_dir(kind: str | None = None) -> Path:
    "The folder of one CPU kind's recording (this host's kind by default)."
    from vtp_nbdev.config import cpu_kind
    return HERE/(kind or cpu_kind())


def recorded_kinds(name: str) -> dict:
    "{kind: recording} of run `name` for every CPU kind recorded."
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(HERE.glob(f'*/{name}.json'))}


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
    "Write tests/golden/<this CPU kind>/<name>.json for the three runs."
    out = kind_dir()
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        for name, v in golden_runs(Path(d)).items():
            (out/f'{name}.json').write_text(json.dumps(v, indent=1, sort_keys=True) + '\n')
    print(f"recorded {out}")


if __name__ == '__main__':
    record()
    sys.exit(0)
