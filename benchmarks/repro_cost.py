"""Where the compute of a reproduction scale went: tokenizer pre-training, evaluation, DiT proxy, text-to-image.

    python benchmarks/repro_cost.py [--scale cpu] [--peak-gflops 165] [--mfu 0.5] [--out figures/repro_cost.md]

Reads the committed points (`results/<scale>/`, `t2i/`) and the run folders they name (`runs/tokenizer/<hash>`, the
DiT proxy runs in `runs/dit/`), so it needs the `runs/` of the machine that ran the batch. For every stage: how many
runs, the wall time they logged, the FLOPs they counted, the FLOP/s they reached, and the time the same FLOPs would
take at the matmul peak (the floor no code change can beat at these settings), and a floor for the whole batch at a
given MFU (`--mfu`): the counted FLOPs at that MFU plus the logged time of the work that counts none. Each tokenizer run is counted once
(a run started from a shared `wsd` stable phase with only the steps it trained itself),
however many points it feeds. Guided points (`guided/`) log no time and are left out (minutes in all).
"""
from __future__ import annotations
import argparse, json, statistics, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def last_row(run: Path) -> dict:
    "The last logged row of a run's `metrics.jsonl` ({} if the run is not here), with `own_flops` (see `own_flops`)."
    p = run / 'metrics.jsonl'
    if not p.exists(): return {}
    lines = p.read_text().splitlines()
    rows = [json.loads(x) for x in lines[:2] + lines[-1:]]
    return dict(rows[-1], own_flops=own_flops(rows)) if rows else {}


def own_flops(rows: list) -> float:
    "FLOPs of the steps this run trained itself: a run started from a shared `wsd` stable phase logs cumulative FLOPs."
    first, last = rows[0], rows[-1]
    if 'flops_per_step' not in last: return last.get('flops', 0)
    every = rows[1]['step'] - first['step'] if len(rows) > 2 and rows[1]['step'] > first['step'] else first['step']
    start = max(first['step'] - every, 0)                                   # the step it started from (0 or the trunk)
    return (last['step'] - start) * last['flops_per_step']


def collect(scale: str, root: Path) -> dict:
    "Per stage: list of (seconds, flops) from the committed points of `scale` and their runs."
    res, runs = root / 'results' / scale, root / 'runs'
    if not res.is_dir(): sys.exit(f"repro_cost: no committed points in {res}: run `vtp-repro --scale {scale}` first")
    points = [json.loads(p.read_text()) for p in sorted(res.glob('*.json'))]
    t2i = [json.loads(p.read_text()) for p in sorted((res / 't2i').glob('*.json'))]
    stages = {k: [] for k in ('tokenizer pre-training', 'evaluation (probe, zero-shot, reconstruction)',
                              'generation point (latents + DiT proxy + sampling + FD)', 'text-to-image point')}
    missing = set()
    for h in sorted({p['config_hash'] for p in points} | {p['config_hash'] for p in t2i}):
        r = last_row(runs / 'tokenizer' / h)
        if r: stages['tokenizer pre-training'].append((r.get('time_s', 0.), r['own_flops']))
        else: missing.add(h)
    for p in points:
        s = p.get('seconds') or {}
        stages['evaluation (probe, zero-shot, reconstruction)'].append((s.get('evaluate', 0.), 0))
        stages['generation point (latents + DiT proxy + sampling + FD)'].append((s.get('generation', 0.), 0))
    for p in t2i:
        s = p.get('seconds') or {}
        stages['text-to-image point'].append((sum(s.values()), p.get('t2i_flops', 0)))
    t2i_sampling = sum((p.get('seconds') or {}).get('sampling_and_metrics', 0.) for p in t2i)   # the part of a t2i point that counts no FLOPs
    proxy = points[0].get('dit_proxy') if points else None                 # the DiT proxy of this scale's points
    dit = []
    for d in sorted((runs / 'dit').glob('*/config.json')) if proxy else []:
        c = json.loads(d.read_text())
        if c.get('preset') == proxy['preset'] and c.get('steps') == proxy['steps'] and c.get('batch') == proxy['batch'] and (d.parent / 'done.json').exists():
            r = last_row(d.parent)
            if r: dit.append((r.get('time_s', 0.), r.get('flops', 0)))
    return dict(stages=stages, dit=dit, proxy=proxy, missing=missing, n_points=len(points), n_t2i=len(t2i), t2i_sampling=t2i_sampling)


def budget_floor(c: dict, peak: float, mfu: float) -> tuple[float, float]:
    "Hours for the counted FLOPs at `mfu` of `peak`, and hours logged by the work that counts no FLOPs."
    st, dit = c['stages'], c['dit']
    flops = sum(f for k in ('tokenizer pre-training', 'text-to-image point') for _, f in st[k]) + sum(f for _, f in dit)
    gen = sum(s for s, _ in st['generation point (latents + DiT proxy + sampling + FD)'])
    rest = sum(s for s, _ in st['evaluation (probe, zero-shot, reconstruction)']) + max(0., gen - sum(s for s, _ in dit)) + c.get('t2i_sampling', 0.)
    return flops / (mfu * peak) / 3600, rest / 3600


def report(c: dict, scale: str, peak: float, mfu: float = 0.5, budget: float = 3.) -> str:
    st, dit = c['stages'], c['dit']
    total = sum(s for v in st.values() for s, _ in v)
    lines = [f'# Where the `{scale}` reproduction spends its compute', '',
             f'Command: `python benchmarks/repro_cost.py --scale {scale} --peak-gflops {peak / 1e9:g}`. {c["n_points"]} points and '
             f'{c["n_t2i"]} text-to-image points committed in `results/{scale}/`; times are what each run logged on 2 cores '
             '(some on a shared machine). "At peak" = the counted FLOPs at the fp32 matmul peak: no code change gets under it.', '',
             '| stage | runs | hours | share | TFLOPs counted | GFLOP/s reached | hours at peak |', '|---|---:|---:|---:|---:|---:|---:|']
    for name, v in st.items():
        s, f = sum(x for x, _ in v), sum(y for _, y in v)
        lines.append(f"| {name} | {len(v)} | {s / 3600:.2f} | {s / max(total, 1e-9):.0%} | {f'{f / 1e12:.0f}' if f else 'not logged'} | "
                     f"{f'{f / s / 1e9:.0f}' if s and f else '—'} | {f'{f / peak / 3600:.2f}' if f else '—'} |")
    if dit:                                                                 # inside the generation points' time
        s, f = sum(x for x, _ in dit), sum(y for _, y in dit)
        lines.append(f"| DiT proxy training (inside the generation points) | {len(dit)} | {s / 3600:.2f} | {s / max(total, 1e-9):.0%} | {f / 1e12:.0f} | {f / s / 1e9:.0f} | {f / peak / 3600:.2f} |")
    lines.append(f'| **total** | | **{total / 3600:.2f}** | | | | |')
    if dit:
        ts, fs = [x for x, _ in dit], [y for _, y in dit]
        gen = [x for x, _ in st['generation point (latents + DiT proxy + sampling + FD)'] if x]
        p = c['proxy']
        lines += ['', f"DiT proxy (`{p['preset']}`, {p['steps']} steps, batch {p['batch']}): {len(dit)} finished runs in `runs/dit/`, "
                  f"median {statistics.median(ts):.0f} s of training at {statistics.median([f / t for f, t in zip(fs, ts)]) / 1e9:.0f} GFLOP/s; "
                  f"a generation point takes median {statistics.median(gen):.0f} s, so the proxy's training is "
                  f"{statistics.median(ts) / statistics.median(gen):.0%} of a point."]
    a, b = budget_floor(c, peak, mfu)
    lines += ['', f"Floor at {mfu:.0%} MFU: the counted FLOPs (tokenizer pre-training, DiT proxy and text-to-image training) take "
              f"{a:.2f} h at {mfu:.0%} of the peak; the work that counts no FLOPs (evaluation; latents, sampling and FD inside the "
              f"generation points; text-to-image sampling and metrics) took {b:.2f} h as logged: **{a + b:.2f} h** in all, against the `{scale}` budget of {budget:g} h."]
    if c['missing']: lines += ['', f"Tokenizer runs named by points but not in `runs/` (not counted): {', '.join(sorted(c['missing']))}."]
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--scale', default='cpu'); p.add_argument('--root', default=str(ROOT))
    p.add_argument('--peak-gflops', type=float, default=165., help='fp32 matmul peak of the machine (bench.py measures it)')
    p.add_argument('--mfu', type=float, default=0.5, help='MFU of the floor line (default: the 50%% target)')
    p.add_argument('--budget-hours', type=float, default=3., help="the scale's time budget (DESIGN.md: 3 h for cpu)")
    p.add_argument('--out', default=None, help="markdown report (default figures/repro_cost.md; '' = print only)")
    a = p.parse_args(argv)
    text = report(collect(a.scale, Path(a.root)), a.scale, a.peak_gflops * 1e9, a.mfu, a.budget_hours)
    print(text)
    out = 'figures/repro_cost.md' if a.out is None else a.out
    if out: (Path(a.root) / out).write_text(text); print('wrote', out)


if __name__ == '__main__':
    main()
