"""Pre-training step throughput and MFU on this machine, measured side by side in one run.

    python benchmarks/bench_pretrain.py [--preset S] [--batch 64] [--iters 5] [--out figures/benchmarks_pretrain.md]

MFU = counted FLOPs per step (torch.utils.flop_counter, forward + backward + teacher forward) / step time / the fp32
matmul peak measured in the same run (a large square matmul). Peers: a timm ViT with the same trunk shape and an
open_clip text transformer with the same text shape, forward + backward on the same batch. Times are medians.
"""
import argparse, platform, resource, statistics, sys, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vtp_nbdev.data import ShapesDataset
from vtp_nbdev.pretrain import PretrainConfig, VTPPretrainer, make_optimizer, count_step_flops
from vtp_nbdev.tokenizer import flop_counter_mode


def matmul_peak(n=2048, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3): a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts)


def time_step(fn, iters):
    fn(); fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='S'); p.add_argument('--batch', type=int, default=64)
    p.add_argument('--iters', type=int, default=5); p.add_argument('--threads', type=int, default=0)
    p.add_argument('--out', default='figures/benchmarks_pretrain.md')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    ds = ShapesDataset(size=a.batch, context_length=32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(a.batch)])
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    peak = matmul_peak()
    rows = []
    def record(name, flops, dt):
        rows.append((name, a.batch / dt, flops / dt / 1e9, flops / dt / peak))
        print(f"{name:45s} {a.batch / dt:8.1f} samples/s {flops / dt / 1e9:7.1f} GFLOP/s  MFU {flops / dt / peak:5.1%}", flush=True)
    for losses, b_rec in (('CLIP+SSL+AE', a.batch // 8), ('AE', a.batch)):
        cfg = PretrainConfig(preset=a.preset, losses=losses, batch_clip=a.batch, batch_ssl=a.batch // 4, batch_rec=b_rec)
        tr = VTPPretrainer(cfg); opt = make_optimizer(tr, cfg)
        flops = count_step_flops(tr, batch)
        def step():
            loss, _ = tr(batch, 1); opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); tr.net.update_teacher(0.99)
        record(f'VTP-{a.preset} {losses} step (batch {a.batch})', flops, time_step(step, a.iters))
    c = tr.model.config
    import timm, open_clip
    vit = timm.models.vision_transformer.VisionTransformer(img_size=c.image_size, patch_size=c.vision_patch_size, embed_dim=c.vision_embed_dim,
                                                          depth=c.vision_depth, num_heads=c.vision_num_heads, mlp_ratio=8 / 3, num_classes=0)
    ours = VTPPretrainer(PretrainConfig(preset=a.preset, losses='CLIP+AE')).model
    for name, fwd, params in (
        (f'timm ViT trunk fwd+bwd ({c.vision_embed_dim}/{c.vision_depth})', lambda: vit(batch['image']).sum(), vit.parameters()),
        (f'our trunk fwd+bwd ({c.vision_embed_dim}/{c.vision_depth})', lambda: ours.forward_features(batch['image'])[0].sum(), ours.trunk.parameters())):
        with flop_counter_mode() as fc: fwd().backward()
        record(name, fc.get_total_flops(), time_step(lambda: fwd().backward(), a.iters))
    txt = open_clip.transformer.TextTransformer(context_length=32, vocab_size=49408, width=c.text_embed_dim, heads=c.text_num_heads,
                                                layers=c.text_depth, output_dim=c.text_embed_dim)
    for name, fwd in ((f'open_clip text fwd+bwd ({c.text_embed_dim}/{c.text_depth})', lambda: txt(batch['tokens']).sum()),
                      (f'our text tower fwd+bwd ({c.text_embed_dim}/{c.text_depth})', lambda: ours.get_clip_text_feature(batch['tokens'], normalize=False).sum())):
        with flop_counter_mode() as fc: fwd().backward()
        record(name, fc.get_total_flops(), time_step(lambda: fwd().backward(), a.iters))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [f"# Pre-training step benchmark ({a.preset} preset, batch {a.batch}, 32 px)", '',
             f"Command: `python benchmarks/bench_pretrain.py --preset {a.preset} --batch {a.batch} --iters {a.iters}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"fp32 matmul peak measured in the same run: **{peak / 1e9:.1f} GFLOP/s**; peak RSS {rss:.0f} MiB.", '',
             '| what | samples/s | GFLOP/s | MFU |', '|---|---:|---:|---:|']
    lines += [f'| {n} | {s:.1f} | {g:.1f} | {m:.1%} |' for n, s, g, m in rows]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text('\n'.join(lines) + '\n')
    print('wrote', a.out)


if __name__ == '__main__':
    main()
