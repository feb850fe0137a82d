"""End-to-end check of the CUDA paths (bf16 autocast, deferred NaN checks, pinned copies, compile): run on a GPU machine.

    python benchmarks/gpu_smoke.py [--out gpu_smoke.json] [--compile]

Pre-trains a `tiny` tokenizer (CLIP+SSL+AE, and with gradient accumulation) for a few steps on CUDA and on CPU from
the same weights and batches, compares the first 3 losses (bf16 vs fp32: within 2%), then trains the DiT proxy
on its latents, samples and scores FD, all on CUDA. Prints and writes one JSON record; exits 1 on any failed check.
"""
from __future__ import annotations
import argparse, json, math, sys, tempfile, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def logged(run: Path) -> list:
    "The logged rows of a run (`metrics.jsonl`)."
    return [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=''); p.add_argument('--compile', action='store_true')
    a = p.parse_args(argv)
    if not torch.cuda.is_available(): p.error(f'torch {torch.__version__} sees no CUDA device: run this on a GPU machine')
    from vtp_nbdev.pretrain import PretrainConfig, pretrain
    from vtp_nbdev.generate import GenerationEvalConfig, generation_metrics
    rec, failed = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name()), []
    runs = Path(tempfile.mkdtemp(prefix='gpu_smoke_'))
    base = dict(preset='tiny', losses='CLIP+SSL+AE', steps=40, batch_clip=64, batch_ssl=16, batch_rec=16, n_local_crops=2,
                log_every=1, ckpt_every=20, dataset_kwargs={'size': 1024})
    for name, kw in (('pretrain', {}), ('pretrain_accum2', dict(grad_accum=2)), *((('pretrain_compile', dict(compile=True)),) if a.compile else ())):
        t = time.time()
        gpu = pretrain(PretrainConfig(**base, **kw), runs_dir=runs/'cuda', device='cuda', progress=False)
        rec[f'{name}_s'] = time.time() - t
        cpu = pretrain(PretrainConfig(**base, **kw), runs_dir=runs/'cpu', device='cpu', max_steps=3, progress=False)
        g, c = logged(gpu), logged(cpu)                                   # the CPU run stops after 3 steps
        rec[name] = dict(cuda_first=[r['loss'] for r in g[:3]], cpu_first=[r['loss'] for r in c], cuda_last=g[-1]['loss'],
                         done=(gpu/'done.json').exists())
        ok = rec[name]['done'] and all(math.isfinite(r['loss']) for r in g) \
            and all(abs(x['loss'] - y['loss']) <= 0.02 * abs(y['loss']) for x, y in zip(g, c))     # bf16 vs fp32, 3 steps
        if not ok: failed.append(name)
        print(name, json.dumps(rec[name]), flush=True)
    t = time.time()
    gen = GenerationEvalConfig(n_latents=1024, dit=dict(preset='tiny', steps=60, batch=64, log_every=10, ckpt_every=60),
                               n_samples=256, n_ref=256, steps=10)
    m = generation_metrics(gpu, gen, device='cuda', progress=False)
    rec['generation'] = dict(FD=m['FD_shapes'], IS=m.get('IS_shapes_mean'), seconds=time.time() - t)
    if not math.isfinite(m['FD_shapes']): failed.append('generation')
    print('generation', json.dumps(rec['generation']), flush=True)
    rec['failed'] = failed
    if a.out: Path(a.out).write_text(json.dumps(rec, indent=1))
    print('FAILED: ' + ', '.join(failed) if failed else 'all CUDA checks passed')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
