"""Where the time of one tokenizer pre-training step goes on a GPU: phases, top kernels, host syncs, memory.

    python benchmarks/gpu_profile.py [--preset paper_S] [--batch 32,128] [--compile] [--out DIR]
    python benchmarks/gpu_profile.py --device cpu --preset tiny --batch 16 --iters 1   # seconds: checks the script runs

For each batch: the step exactly as `bench.py` times it (bf16 autocast forward, backward, clip, AdamW, EMA teacher),
then
- samples/s and MFU (counted FLOPs / median step time / measured bf16 matmul peak);
- the share of the step the GPU is busy (sum of kernel times / wall time: far below 1 means launch- or host-bound);
- time per phase (teacher targets, student SSL, CLIP text tower, pixel decoder + reconstruction loss, backward,
  optimiser, EMA) from `torch.profiler` record_function ranges, CPU and GPU side;
- the top operators by GPU time and by CPU time;
- every host-device synchronisation inside one step (`torch.cuda.set_sync_debug_mode`), with the line that caused it;
- peak memory allocated per phase.
Tables are printed and written to `DIR/profile_<preset>_<batch>[_compiled].txt`.
"""
from __future__ import annotations
import argparse, collections, sys, time, warnings
from pathlib import Path
import torch
from torch.profiler import profile, record_function, ProfilerActivity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'benchmarks'))
from bench import autocast, matmul_peak, peak_memory_mib, reset_peak_memory, shapes_batch, sync, tokenizer_config, time_fn  # noqa: E402

PHASES = dict(ssl_targets='teacher targets (multi-crop, masks, EMA teacher, centring)', ssl_student='student SSL (DINO + iBOT)',
              get_clip_text_feature='CLIP text tower', get_latents_decoded_images='pixel decoder', rec_loss='reconstruction loss')


class PhaseTimer:
    "Wraps methods in `record_function('phase:<name>')` and tracks the peak memory allocated inside each."
    def __init__(self): self.peak, self.track = collections.defaultdict(float), False

    def wrap(self, obj, name, label=None):
        fn, label = getattr(obj, name), label or name
        def wrapped(*a, **k):
            if self.track: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
            with record_function(f'phase:{label}'): out = fn(*a, **k)
            if self.track: torch.cuda.synchronize(); self.peak[label] = max(self.peak[label], (torch.cuda.max_memory_allocated() - base) / 2 ** 20)
            return out
        obj.__dict__[name] = wrapped                         # an instance attribute shadows the method (modules too)


def sync_and_memory_report(step, timer) -> list:
    "Host-device syncs inside one step (with the line that caused each), then per-phase peak memory (a synchronising step)."
    syncs = collections.Counter()
    torch.cuda.set_sync_debug_mode('warn')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always'); step()
    torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if 'synchroniz' in str(w.message): syncs[f'{Path(w.filename).name}:{w.lineno}'] += 1
    timer.track = True; step(); timer.track = False
    return [f'## host syncs in one step: {sum(syncs.values())}', *[f'- {k}: {v}' for k, v in syncs.most_common(20)], '',
            '## peak memory allocated inside each phase (MiB)', *[f'- {k}: {v:.0f}' for k, v in timer.peak.items()], '']


def profile_step(preset, losses, batch, compiled, peak, out_dir, iters, dev):
    from vtp_nbdev.pretrain import VTPPretrainer, make_optimizer, count_step_flops, compile_blocks
    cfg = tokenizer_config(preset, losses, batch, 'paper' if dev.type == 'cuda' else 'cpu')
    torch.manual_seed(0)
    reset_peak_memory(dev)
    tr = VTPPretrainer(cfg).to(dev); opt = make_optimizer(tr, cfg); m = tr.model
    data = shapes_batch(batch, m.config.image_size, m.config.text_context_length, dev)
    flops = count_step_flops(tr, data)
    timer = PhaseTimer()
    for name in ('ssl_targets', 'ssl_student'): timer.wrap(tr, name)
    for name in ('get_clip_text_feature', 'get_latents_decoded_images'): timer.wrap(m, name)
    timer.wrap(tr.rec_loss, 'forward', 'rec_loss')
    if compiled: compile_blocks(tr)

    def step():
        with autocast(dev): loss, _ = tr(data, 1)
        opt.zero_grad(set_to_none=True)
        with record_function('phase:backward'): loss.backward()
        with record_function('phase:optimizer'):
            torch.nn.utils.clip_grad_norm_(tr.parameters(), cfg.grad_clip); opt.step()
        with record_function('phase:ema'): tr.net.update_teacher(0.99)

    t0 = time.perf_counter(); step(); sync(dev); first = time.perf_counter() - t0
    dt = time_fn(step, iters, dev)
    lines = [f'# VTP-{preset} {losses} step, batch {batch}{" (compiled blocks)" if compiled else ""}', '',
             f'b_ssl {cfg.batch_ssl}, b_rec {cfg.batch_rec}, {cfg.n_local_crops} local crops; first step {first:.1f} s',
             f'median step {dt * 1e3:.1f} ms: {batch / dt:.1f} samples/s, {flops / dt / 1e12:.1f} TFLOP/s, MFU {flops / dt / peak:.1%} '
             f'(matmul peak {peak / 1e12:.2f} TFLOP/s), peak memory {peak_memory_mib(dev):.0f} MiB', '']
    if dev.type == 'cuda': lines += sync_and_memory_report(step, timer)

    sync(dev)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(3): step()
        sync(dev); wall = (time.perf_counter() - t0) / 3
    ka = prof.key_averages()
    dev_attr = 'self_device_time_total' if hasattr(ka[0], 'self_device_time_total') else 'self_cuda_time_total'
    dev_total = 'device_time_total' if hasattr(ka[0], 'device_time_total') else 'cuda_time_total'
    kernels = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith(('phase:', 'Optimizer.'))]
    busy = sum(getattr(e, dev_attr) for e in kernels) / 3 / 1e6                # kernel seconds per step
    phases = collections.defaultdict(lambda: [0., 0.])                          # name -> [host ms, GPU span ms] per step
    for e in ka:
        if e.key.startswith('phase:'):
            ph = phases[e.key[6:]]; ph[0] = max(ph[0], e.cpu_time_total / 3e3); ph[1] = max(ph[1], getattr(e, dev_total) / 3e3)
    lines += [f'## GPU busy {busy * 1e3:.1f} ms of a {wall * 1e3:.1f} ms step ({busy / wall:.0%}) under the profiler', '',
              '## phases (per step; host = CPU time inside the range, GPU = the span of its kernels)', '',
              *[f"- {k:28s} host {h:8.1f} ms  GPU {g:8.1f} ms  {PHASES.get(k, '')}" for k, (h, g) in phases.items()]]
    lines += ['', '## top operators by GPU time (3 steps)', ka.table(sort_by=dev_attr, row_limit=25, max_name_column_width=60),
              '## top operators by CPU time (3 steps)', ka.table(sort_by='self_cpu_time_total', row_limit=20, max_name_column_width=60)]
    text = '\n'.join(lines)
    print(text, flush=True)
    if out_dir:
        p = Path(out_dir) / f'profile_{preset}_{batch}{"_compiled" if compiled else ""}.txt'
        p.parent.mkdir(parents=True, exist_ok=True); p.write_text(text)
    del tr, opt
    if dev.type == 'cuda': torch.cuda.empty_cache()
    return dict(batch=batch, compiled=compiled, step_ms=dt * 1e3, samples_per_s=batch / dt, mfu=flops / dt / peak, busy=busy / wall)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='paper_S'); p.add_argument('--losses', default='CLIP+SSL+AE')
    p.add_argument('--batch', default='32,128', help='comma-separated per-GPU batches')
    p.add_argument('--compile', action='store_true', help='also profile with compiled blocks (after the eager runs)')
    p.add_argument('--iters', type=int, default=5); p.add_argument('--out', default='')
    p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'), help='cpu: a dry run of the script (no sync / memory report)')
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == 'cuda' and not torch.cuda.is_available(): p.error(f'torch {torch.__version__} sees no CUDA device: run this on a GPU machine')
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_peak(dev, torch.bfloat16 if dev.type == 'cuda' else torch.float32)
    rows = [profile_step(a.preset, a.losses, int(b), c, peak, a.out, a.iters, dev)
            for c in ((False, True) if a.compile else (False,)) for b in a.batch.split(',')]
    print('\n| batch | compiled | step ms | samples/s | MFU | GPU busy |\n|---:|---|---:|---:|---:|---:|')
    for r in rows: print(f"| {r['batch']} | {'yes' if r['compiled'] else 'no'} | {r['step_ms']:.1f} | {r['samples_per_s']:.1f} | {r['mfu']:.1%} | {r['busy']:.0%} |")


if __name__ == '__main__':
    main()
