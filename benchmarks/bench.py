"""Throughput, MFU and memory of every hot path of the reproduction, measured side by side in one run.

    python benchmarks/bench.py                       # CPU: the CPU presets (about 2-3 minutes on 2 cores)
    python benchmarks/bench.py --device cuda [--compile] [--batch 32]   # GPU: the paper presets, bf16 autocast
    python benchmarks/bench.py --quick --out /tmp/b.md                  # a few seconds: checks that everything runs
    python benchmarks/bench.py --width-scan          # CPU: MFU against model width, eager vs compiled (about 6 minutes)
    python benchmarks/bench.py --host-scan           # per-rank host time of masks + indices vs world size (~1 minute)

Rows (medians of `--iters` timed calls after 2 warm-up calls):
- peak: a large square matmul (fp32 on CPU; fp32 and bf16 on CUDA): the denominator of MFU;
- the VTP pre-training step (CLIP+SSL+AE: forward, EMA-teacher forward, backward, clip, AdamW, EMA) and the AE step,
  at the tokenizer presets (`S`, `tiny` on CPU; `paper_S/B/L` on CUDA), batch ratios of the scale's settings;
- timm ViT / open_clip text tower peers on identical shapes (forward + backward), next to our trunk / text tower;
- the LightningDiT flow-matching training step (DiT-S, the `cpu` generation proxy; `B/1`, `XL/1` on CUDA);
- DiT sampling: `--sample-n` class-balanced latents (default 1000) x `--sample-steps` Euler steps (default 50) in
  batches of `--sample-batch`, decoded to images by the tokenizer's pixel decoder; time per NFE and in total.

FLOPs are counted by torch.utils.flop_counter (`count_step_flops`, `count_dit_step_flops`, `dit_forward_flops`), so
MFU = counted FLOPs / time / measured peak; on a GPU also against its spec dense bf16 peak (`MFU (spec)`).
On CPU the peak is measured again after every row and each row uses the larger
of the probes just before and just after it (this shared host's peak drifted 88–171 GFLOP/s within one run); peers are compared per
interleaved round (median and quartiles of the speed ratio). A timm ViT-Ti/4 step at 32 px, a reference step, is
measured in the same run. Peak memory: the process's peak RSS per row on CPU (reset through
/proc/self/clear_refs), `torch.cuda.max_memory_allocated` on CUDA. The markdown report (`--out`) holds the command,
the machine (with its load average before and after: numbers taken on a busy machine are not comparable), the table
and the comparison with the performance targets.
"""
from __future__ import annotations
import argparse, contextlib, os, platform, re, resource, statistics, sys, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = dict(tokenizer_mfu=0.50, dit_mfu=0.50, sampling_s=60.0)
# dense bf16 tensor-core peaks of the vendors' spec sheets, TFLOP/s without sparsity (longest name matched first)
GPU_SPEC_BF16_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'H100 PCIe': 756.0, 'GH200': 989.0, 'B200': 2250.0,
                        'A100': 312.0, 'L40S': 362.0, 'L4': 121.0, 'A10': 125.0}


def spec_peak(gpu_name: str) -> float | None:
    "The spec dense bf16 peak (FLOP/s) of a GPU named like `NVIDIA H100 80GB HBM3`; None when it is not in the table."
    for k in sorted(GPU_SPEC_BF16_TFLOPS, key=len, reverse=True):
        if re.search(rf'(?<!\w){re.escape(k)}(?!\w)', gpu_name):
            return GPU_SPEC_BF16_TFLOPS[k] * 1e12
    return None


def spec_mfu_words(gpu_name: str) -> str:
    "The report line naming the spec peak that the `MFU (spec)` column divides by."
    peak = spec_peak(gpu_name)
    if peak is None:
        return f"No spec peak known for {gpu_name}: the `MFU (spec)` column is empty."
    return (f"`MFU (spec)` = GFLOP/s / the spec dense bf16 peak of the {gpu_name}, {peak / 1e12:.0f} TFLOP/s "
            "(the vendor's figure; the measured matmul probe is usually lower).")
DEFAULTS = dict(cpu=dict(tok_presets='S,tiny', dit_presets='S', batch=64, dit_batch=64, sample_tok='tiny', scale='cpu'),
                cuda=dict(tok_presets='paper_S,paper_B,paper_L', dit_presets='B/1,XL/1', batch=32, dit_batch=64,
                          sample_tok='paper_S', scale='paper'))


def sync(device):
    "Wait for queued kernels (CUDA); nothing on CPU."
    if device.type == 'cuda': torch.cuda.synchronize(device)


def reset_peak_memory(device):
    "Start a new peak-memory window (CUDA allocator stats; on Linux CPU the RSS high-water mark)."
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device); return
    try: Path('/proc/self/clear_refs').write_text('5')
    except OSError: pass


def peak_memory_mib(device) -> float:
    "Peak memory since `reset_peak_memory`: CUDA max allocated, else peak RSS (VmHWM; ru_maxrss as a fallback)."
    if device.type == 'cuda': return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('VmHWM:'): return int(line.split()[1]) / 1024
    except OSError: pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_fn(fn, iters: int, device, warmup: int = 2) -> float:
    "Median wall time of `fn()` over `iters` calls after `warmup` calls (synchronised on CUDA)."
    for _ in range(warmup): fn()
    sync(device); ts = []
    for _ in range(iters):
        t = time.perf_counter(); fn(); sync(device); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def matmul_peak(device, dtype=torch.float32, n: int | None = None, reps: int = 10) -> float:
    "FLOP/s of a large square matmul (the MFU denominator), median of `reps`."
    n = n or (8192 if device.type == 'cuda' else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / time_fn(lambda: a @ b, reps, device, warmup=3)


def autocast(device):
    "bf16 autocast on CUDA (as the training loops), a no-op context on CPU."
    return torch.autocast('cuda', torch.bfloat16) if device.type == 'cuda' else contextlib.nullcontext()


def shapes_batch(n: int, res: int, context_length: int, device) -> dict:
    "`n` samples of the `shapes` dataset at `res` px, collated, tensors on `device`."
    from vtp_nbdev.data import ShapesDataset
    ds = ShapesDataset(size=n, res=res, context_length=context_length)
    b = torch.utils.data.default_collate([ds[i] for i in range(n)])
    return {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}


def tokenizer_config(preset: str, losses: str, batch: int, scale: str):
    "A `PretrainConfig` at `preset` with the SSL / reconstruction subsets and crops of `scale`'s tokenizer settings."
    from vtp_nbdev.pretrain import PretrainConfig
    from vtp_nbdev.scaling import SCALE_SETTINGS
    t = SCALE_SETTINGS[scale]['tokenizer']
    b_ssl = max(2, batch * t['batch_ssl'] // t['batch_clip']); b_rec = max(1, batch * t['batch_ssl_rec'] // t['batch_clip'])
    return PretrainConfig(preset=preset, losses=losses, batch_clip=batch, batch_ssl=b_ssl, batch_rec=batch if losses == 'AE' else b_rec,
                          n_local_crops=t['n_local_crops'])


class Bench:
    "Collects rows (name, samples/s, GFLOP/s, MFU, peak MiB, note) and prints each as it is measured."
    def __init__(self, device, peak: float, iters: int, compile: bool, local_peak: bool | None = None):
        self.device, self.peak, self.iters, self.compile, self.rows = device, peak, iters, compile, {}
        self.local_peak = device.type == 'cpu' if local_peak is None else local_peak   # a shared CPU host drifts within a run
        self.prev_peak, self.peaks = peak, [peak]

    def record(self, key, name, samples, flops, dt, mem, note='', mfu=None):
        "Add a row; on CPU its MFU is against the larger of the matmul peaks measured just before and just after it (or `mfu`)."
        if mfu is not None: peak = flops / dt / mfu                  # measured per round by `paired`
        elif self.local_peak:
            after = matmul_peak(self.device, reps=5); self.peaks.append(after)
            peak, self.prev_peak = max(self.prev_peak, after), after
        else: peak = self.peak                                     # CUDA: one peak, updated by `finish_peak`
        r = dict(name=name, samples_per_s=samples / dt, gflops=flops / dt / 1e9, mfu=flops / dt / peak, mem_mib=mem, s=dt, note=note, peak=peak)
        self.rows[key] = r
        print(f"{name:52s} {r['samples_per_s']:9.1f} samples/s {r['gflops']:8.1f} GFLOP/s  MFU {r['mfu']:6.1%}  {mem:7.0f} MiB  {note}", flush=True)
        return r

    def paired(self, cases: dict, rounds: int) -> dict:
        "{label: (median s, median MFU)} of `cases` {label: (step, flops)} timed interleaved, each round between two matmul-peak probes."
        for step, _ in cases.values(): step(); step()               # compilation and warm-up
        peaks, ts, mfu = [matmul_peak(self.device, reps=2)], {k: [] for k in cases}, {k: [] for k in cases}
        self.peaks.append(peaks[0])
        for r in range(rounds):
            for k in (list(cases) if r % 2 else list(cases)[::-1]):
                sync(self.device); t = time.perf_counter(); cases[k][0](); sync(self.device); ts[k].append(time.perf_counter() - t)
            peaks.append(matmul_peak(self.device, reps=2)); self.peaks.append(peaks[-1])
            for k in cases: mfu[k].append(cases[k][1] / ts[k][-1] / max(peaks[-2:]))   # this round's peak: the larger probe around it
        return {k: (statistics.median(ts[k]), statistics.median(mfu[k])) for k in cases}

    def make_tokenizer_step(self, preset, losses, batch, scale, compiled=False):
        "(step, flops, cfg, trainer, batch) of the pre-training step as `pretrain()` runs it (`compiled`: `cfg.compile`)."
        from vtp_nbdev.pretrain import VTPPretrainer, make_optimizer, count_step_flops, compile_blocks
        cfg = tokenizer_config(preset, losses, batch, scale)
        torch.manual_seed(0)
        tr = VTPPretrainer(cfg).to(self.device); opt = make_optimizer(tr, cfg)
        mc = tr.model.config
        data = shapes_batch(batch, mc.image_size, mc.text_context_length, self.device)
        flops = count_step_flops(tr, data)
        if compiled: compile_blocks(tr)                            # as `pretrain(compile=True)`: each block, in place
        def step():
            with autocast(self.device): loss, _ = tr(data, 1)
            opt.zero_grad(set_to_none=True); loss.backward()
            torch.nn.utils.clip_grad_norm_(tr.parameters(), cfg.grad_clip); opt.step(); tr.net.update_teacher(0.99)
        return step, flops, cfg, tr, data

    def tokenizer_step(self, preset, losses, batch, scale, compiled=False):
        "The pre-training step as `pretrain()` runs it: forward (autocast), backward, grad clip, AdamW, EMA teacher (`compiled`: `cfg.compile`)."
        reset_peak_memory(self.device)
        step, flops, cfg, tr, data = self.make_tokenizer_step(preset, losses, batch, scale, compiled)
        t0 = time.perf_counter(); step(); warm = time.perf_counter() - t0        # compilation happens here
        dt = time_fn(step, self.iters, self.device)
        note = f"b_ssl {cfg.batch_ssl}, b_rec {cfg.batch_rec}, {cfg.n_local_crops} local crops" + (f'; first step (compilation) {warm:.0f} s' if compiled else '')
        self.record(f'tok/{preset}/{losses}' + ('/compiled' if compiled else ''), f'VTP-{preset} {losses} step (batch {batch})' +
                    (', compiled blocks' if compiled else ''), batch, flops, dt, peak_memory_mib(self.device), note)
        return tr, data

    def peers(self, tr, data, preset):
        "timm ViT vs our trunk, open_clip text tower vs ours: forward + backward on identical shapes, timed interleaved."
        import timm, open_clip
        from vtp_nbdev.layers import flop_counter_mode
        c, dev, ours = tr.model.config, self.device, tr.model
        B = data['image'].shape[0]
        vit = timm.models.vision_transformer.VisionTransformer(
            img_size=c.image_size, patch_size=c.vision_patch_size, embed_dim=c.vision_embed_dim, depth=c.vision_depth,
            num_heads=c.vision_num_heads, mlp_ratio=8 / 3, num_classes=0).to(dev)
        eva = timm.models.eva.Eva(                                # the same block as ours: RMSNorm, SwiGLU 8/3, 2-D RoPE
            img_size=c.image_size, patch_size=c.vision_patch_size, embed_dim=c.vision_embed_dim, depth=c.vision_depth,
            num_heads=c.vision_num_heads, mlp_ratio=c.vision_mlp_ratio * 2 / 3, swiglu_mlp=True, use_abs_pos_emb=False,
            use_rot_pos_emb=True, norm_layer=timm.layers.RmsNorm, num_classes=0).to(dev)
        L = data['tokens'].shape[1]
        txt = open_clip.transformer.TextTransformer(context_length=L, vocab_size=49408, width=c.text_embed_dim, heads=c.text_num_heads,
                                                    layers=c.text_depth, output_dim=c.text_embed_dim).to(dev)
        cases = [(f'peer/{preset}/timm', f'timm ViT (GELU MLP 8/3) trunk fwd+bwd ({c.vision_embed_dim}/{c.vision_depth})', lambda: vit(data['image']).float().sum()),
                 (f'peer/{preset}/eva', f'timm EVA (SwiGLU, RoPE) trunk fwd+bwd ({c.vision_embed_dim}/{c.vision_depth})', lambda: eva(data['image']).float().sum()),
                 (f'peer/{preset}/trunk', f'our trunk fwd+bwd ({c.vision_embed_dim}/{c.vision_depth})', lambda: ours.forward_features(data['image'])[0].float().sum()),
                 (f'peer/{preset}/open_clip', f'open_clip text fwd+bwd ({c.text_embed_dim}/{c.text_depth})', lambda: txt(data['tokens']).float().sum()),
                 (f'peer/{preset}/text', f'our text tower fwd+bwd ({c.text_embed_dim}/{c.text_depth})',
                  lambda: ours.get_clip_text_feature(data['tokens'], normalize=False).float().sum())]
        flops, runs = {}, {}
        for key, name, fwd in cases:
            with flop_counter_mode() as fc: fwd().backward()
            flops[key] = fc.get_total_flops()
            def run(fwd=fwd):
                with autocast(dev): out = fwd()
                out.backward()
            runs[key] = run
        reset_peak_memory(dev)
        ts = {k: [] for k in runs}                                  # interleaved, alternating order: no order/drift bias
        for r in range(2 + self.iters):
            for k in (list(runs) if r % 2 else list(runs)[::-1]):
                sync(dev); t = time.perf_counter(); runs[k](); sync(dev)
                if r >= 2: ts[k].append(time.perf_counter() - t)    # the first two rounds warm up
        for key, name, _ in cases:
            self.record(key, name, B, flops[key], statistics.median(ts[key]), peak_memory_mib(dev), 'timed interleaved with its peer')
            self.rows[key]['times'] = ts[key]

    def paired_ratio(self, ours: str, peer: str) -> tuple[float, float, float]:
        "Per round, peer time / our time (> 1: ours faster): the median and the quartiles over the interleaved rounds."
        r = sorted(q / o for o, q in zip(self.rows[ours]['times'], self.rows[peer]['times']))
        q1, med, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0],) * 3
        return med, q1, q3

    def make_dit_step(self, preset, batch, compiled=False, **overrides):
        "(step, flops, args) of the flow-matching step as `train_dit()` runs it (`compiled`: `cfg.compile`)."
        from vtp_nbdev.dit import dit_config
        from vtp_nbdev.flow import DiTTrainConfig, DiTTrainer, count_dit_step_flops
        args = dit_config(preset, **overrides); cfg = DiTTrainConfig(preset=preset, batch=batch)
        torch.manual_seed(0)
        tr = DiTTrainer(args, cfg).to(self.device)
        opt = torch.optim.AdamW(tr.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)   # as train_dit
        C, H, dev = args['in_channels'], args['input_size'], self.device
        data = dict(x1=torch.randn(batch, C, H, H, device=dev), y=torch.randint(0, args['num_classes'], (batch,), device=dev),
                    t=torch.rand(batch, device=dev), x0=torch.randn(batch, C, H, H, device=dev), drop=torch.zeros(batch, dtype=torch.long, device=dev))
        flops = count_dit_step_flops(tr, data)
        net = torch.compile(tr.model) if compiled else tr.model
        def step():
            with autocast(dev): loss, _ = tr.loss(net, **data)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); tr.update_ema(0.999)
        return step, flops, args

    def dit_step(self, preset, batch, compiled=False, **overrides):
        "The flow-matching step as `train_dit()` runs it: forward (autocast), backward, AdamW, EMA (`compiled`: `cfg.compile`)."
        reset_peak_memory(self.device)
        step, flops, args = self.make_dit_step(preset, batch, compiled, **overrides)
        C, H, dev = args['in_channels'], args['input_size'], self.device
        t0 = time.perf_counter(); step(); warm = time.perf_counter() - t0        # compilation happens here
        name = preset + ''.join(f', {k}={v}' for k, v in overrides.items())
        self.record(f'dit/{name}' + ('/compiled' if compiled else ''), f'LightningDiT-{name} train step (batch {batch}, {C}x{H}x{H})' +
                    (', torch.compile' if compiled else ''), batch, flops, time_fn(step, self.iters, dev), peak_memory_mib(dev),
                    f'first step (compilation) {warm:.0f} s' if compiled else '')

    def reference_vit(self, batch):
        "The reference point: a timm ViT-Ti/4 training step at 32 px (forward, cross-entropy, backward, fused AdamW)."
        import timm
        from vtp_nbdev.layers import flop_counter_mode
        dev = self.device
        reset_peak_memory(dev); torch.manual_seed(0)
        vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=10).to(dev)
        opt = torch.optim.AdamW(vit.parameters(), lr=1e-3, fused=True)
        x, y = torch.randn(batch, 3, 32, 32, device=dev), torch.randint(0, 10, (batch,), device=dev)
        with flop_counter_mode() as fc: torch.nn.functional.cross_entropy(vit(x), y).backward()
        def step():
            with autocast(dev): loss = torch.nn.functional.cross_entropy(vit(x).float(), y)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        self.record('ref/vit_ti4', f'timm ViT-Ti/4 train step, 32 px (192/12; batch {batch})', batch, fc.get_total_flops(),
                    time_fn(step, self.iters, dev), peak_memory_mib(dev), "reference step (~60% MFU on typical hardware)")

    def sampling(self, preset, tok_preset, n, steps, batch_size, compiled=False):
        "`n` class-balanced latents x `steps` Euler steps (batched), then decoded by the tokenizer's pixel decoder."
        from vtp_nbdev.dit import LightningDiT, dit_config, dit_forward_flops
        from vtp_nbdev.flow import sample_latents
        from vtp_nbdev.layers import flop_counter_mode
        from vtp_nbdev.tokenizer import VTPModel, vtp_config
        from vtp_nbdev.data import to_uint8
        dev = self.device
        reset_peak_memory(dev)
        torch.manual_seed(0)
        tc = vtp_config(tok_preset, train_clip=False)
        model = LightningDiT(**dit_config(preset, input_size=tc.image_size // tc.vision_patch_size, in_channels=tc.vision_feature_bottleneck)).to(dev).eval()
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)               # non-zero velocities (cost is the same)
        if compiled: model.compile()                                                    # in place: the module keeps its attributes
        tok = VTPModel(tc).to(dev).eval()
        nfe_flops = dit_forward_flops(model, 1)
        z1 = torch.zeros(1, tc.vision_feature_bottleneck, model.grid * model.patch_size, model.grid * model.patch_size, device=dev)
        with flop_counter_mode() as fc, torch.no_grad(): tok.get_latents_decoded_images(z1)
        dec_flops = fc.get_total_flops()
        if batch_size == 0:                                       # auto: the fastest batch per NFE (2-NFE probes)
            probe = {}
            for bs in sorted({min(n, x) for x in (64, 256, 1000)}):
                with autocast(dev): sample_latents(model, bs, batch_size=bs, num_steps=2)      # warm-up
                sync(dev); t = time.perf_counter()
                with autocast(dev): sample_latents(model, bs, batch_size=bs, num_steps=3)
                sync(dev); probe[bs] = 2 * bs / (time.perf_counter() - t)
            batch_size = max(probe, key=probe.get)
            self.probe = ', '.join(f'{k}: {v:.0f}' for k, v in probe.items())
            print(f'  sampling batch probe (latent-NFEs/s by batch) {self.probe} -> {batch_size}', flush=True)
        with autocast(dev): sample_latents(model, n if compiled else min(n, batch_size), batch_size=batch_size, num_steps=3, timestep_shift=0.3)   # warm-up (every batch shape compiled)
        sync(dev); t0 = time.perf_counter()
        with autocast(dev): z, _ = sample_latents(model, n, batch_size=batch_size, num_steps=steps + 1, sampler='euler', timestep_shift=0.3)
        sync(dev); t1 = time.perf_counter()
        with torch.inference_mode(), autocast(dev):
            imgs = torch.cat([to_uint8(tok.get_latents_decoded_images(z[s:s + batch_size].to(dev)).float()).cpu() for s in range(0, n, batch_size)])
        sync(dev); t2 = time.perf_counter()
        assert imgs.shape == (n, 3, tc.image_size, tc.image_size) and imgs.dtype == torch.uint8
        mem = peak_memory_mib(dev)
        ode, dec = t1 - t0, t2 - t1
        sfx, lab = ('/compiled', ', torch.compile') if compiled else ('', '')
        self.record(f'sample/{preset}/nfe{sfx}', f'DiT-{preset} sampling, per NFE (batches of {batch_size}){lab}', n, n * nfe_flops, ode / steps, mem,
                    f'{ode / steps * 1e3:.0f} ms per NFE for {n} latents' + (f'; batch probe (latent-NFEs/s) {self.probe}' if getattr(self, 'probe', None) else ''))
        self.record(f'sample/{preset}/decode{sfx}', f'tokenizer-{tok_preset} decoding ({n} latents)', n, n * dec_flops, dec, mem, f'{dec:.2f} s')
        r = self.record(f'sample/{preset}/total{sfx}', f'{n} images x {steps} Euler steps, incl. decoding{lab}', n, n * (steps * nfe_flops + dec_flops),
                        t2 - t0, mem, f'**{t2 - t0:.1f} s**')
        r['total_s'], r['est_1k50_s'] = t2 - t0, ode / (n * steps) * 50_000 + dec / n * 1000   # extrapolated to 1000 x 50
        return r


PEAK_WORDS = {True: 'the larger of the matmul peaks measured just before and just after the row (the shared host drifts)',
              False: 'the measured matmul peak'}


def finish_peak(b: Bench, dtype, label: str) -> str:
    "CUDA: measure the peak again after the rows and use the larger of the two for every row. CPU: describe the local peaks."
    if b.local_peak:
        p = sorted(b.peaks)
        return (f"{label} matmul peak measured {len(p)} times, around every row (and every round of paired rows): {p[0] / 1e9:.1f} to {p[-1] / 1e9:.1f} GFLOP/s "
                f"(median {statistics.median(p) / 1e9:.1f}); each row's MFU is against the larger of the peaks measured just before and just after it")
    again = matmul_peak(b.device, dtype)
    b.peak = max(b.peak, again)
    for r in b.rows.values(): r['mfu'], r['peak'] = r['gflops'] * 1e9 / b.peak, b.peak
    return f"{label} matmul peak measured before and after the rows: {b.peak0 / 1e9:.1f} and {again / 1e9:.1f} GFLOP/s, MFU against the larger"


def machine(device) -> str:
    "One line describing the machine."
    cpu = platform.processor() or platform.machine()
    try: cpu = next(l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines() if l.startswith('model name'))
    except (OSError, StopIteration): pass
    s = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    if device.type == 'cuda': s += f"; GPU {torch.cuda.get_device_name(device)}"
    return s


def rows_table(b: Bench, gpu_name: str | None = None) -> list:
    "The markdown table of the rows; on a GPU with an `MFU (spec)` column against its spec peak, after a line naming it."
    if gpu_name is None:
        head = ['| what | samples/s | GFLOP/s | MFU | peak MiB | note |', '|---|---:|---:|---:|---:|---|']
        return head + [f"| {r['name']} | {r['samples_per_s']:.1f} | {r['gflops']:.1f} | {r['mfu']:.1%} | "
                       f"{r['mem_mib']:.0f} | {r['note']} |" for r in b.rows.values()]
    peak = spec_peak(gpu_name)
    spec = lambda r: '' if peak is None else f"{r['gflops'] * 1e9 / peak:.1%}"
    head = [spec_mfu_words(gpu_name), '', '| what | samples/s | GFLOP/s | MFU | MFU (spec) | peak MiB | note |',
            '|---|---:|---:|---:|---:|---:|---|']
    return head + [f"| {r['name']} | {r['samples_per_s']:.1f} | {r['gflops']:.1f} | {r['mfu']:.1%} | {spec(r)} | "
                   f"{r['mem_mib']:.0f} | {r['note']} |" for r in b.rows.values()]


def targets_table(b: Bench, a) -> list:
    "Markdown rows comparing the measurements with the performance targets."
    R, out = b.rows, []
    def row(what, target, got, ok): out.append(f"| {what} | {target} | {got} | {'yes' if ok else '**no**'} |")
    tok = a.tok_presets.split(',')[0]
    for sfx, lab in (('', ''), ('/compiled', ', compiled blocks')):
        if (r := R.get(f'tok/{tok}/CLIP+SSL+AE{sfx}')): row(f'tokenizer step (CLIP+SSL+AE) MFU at `{tok}`{lab}', f"≥ {TARGETS['tokenizer_mfu']:.0%}", f"{r['mfu']:.1%}", r['mfu'] >= TARGETS['tokenizer_mfu'])
        if (r := R.get(f'tok/{tok}/AE{sfx}')): row(f'AE step MFU at `{tok}`{lab}', f"≥ {TARGETS['tokenizer_mfu']:.0%}", f"{r['mfu']:.1%}", r['mfu'] >= TARGETS['tokenizer_mfu'])
    for p in a.tok_presets.split(','):
        for ours, peer, what in (('trunk', 'eva', 'ViT trunk vs timm EVA (same block: RMSNorm, SwiGLU, RoPE)'),
                                 ('text', 'open_clip', 'text tower vs open_clip'),
                                 ('trunk', 'timm', 'ViT trunk vs timm ViT with a GELU MLP (2/3 of our MLP FLOPs: for information)')):
            if (o := R.get(f'peer/{p}/{ours}')) and (q := R.get(f'peer/{p}/{peer}')):
                med, q1, q3 = b.paired_ratio(f'peer/{p}/{ours}', f'peer/{p}/{peer}')
                got = f'{med:.2f} (quartiles {q1:.2f}–{q3:.2f})'
                if peer == 'timm': out.append(f"| {what} at `{p}` (speed ratio, paired rounds) | — | {got} | — |")
                else: row(f'{what} at `{p}` (speed ratio, paired rounds)', 'no slower (≥ 1.00; upper quartile, within noise)', got, q3 >= 1.0)
    for p in a.dit_presets.split(','):
        for sfx, lab in (('', ''), ('/compiled', ', torch.compile')):
            if (r := R.get(f'dit/{p}{sfx}')): row(f'DiT-{p} training step MFU{lab}', f"≥ {TARGETS['dit_mfu']:.0%}", f"{r['mfu']:.1%}", r['mfu'] >= TARGETS['dit_mfu'])
            if (r := R.get(f'sample/{p}/total{sfx}')):
                full = (a.sample_n, a.sample_steps) == (1000, 50)
                row(f'1000 images x 50 Euler steps, DiT-{p}, incl. decoding{lab}', f"≤ {TARGETS['sampling_s']:.0f} s",
                    f"{r['total_s']:.1f} s" if full else f"{r['est_1k50_s']:.1f} s (extrapolated from {a.sample_n} x {a.sample_steps})",
                    (r['total_s'] if full else r['est_1k50_s']) <= TARGETS['sampling_s'])
    return out


SCAN_TOK = ('tiny', 'S', 'B', 'L')                                       # the CPU tokenizer presets: widths 64, 96, 160, 256
SCAN_DIT = (('tiny', {}), ('S', {}), ('B', {}), ('S', dict(hidden_size=192)), ('S', dict(hidden_size=384)))   # DiT widths 64-384


def width_scan(b: Bench, a) -> list:
    "Measure MFU against model width: every CPU tokenizer preset's CLIP+SSL+AE step, DiT steps 64-384 wide; eager and compiled."
    from vtp_nbdev.tokenizer import vtp_config
    from vtp_nbdev.dit import dit_config
    b.reference_vit(a.batch)
    table = []
    def pair(key, name, samples, make):                            # eager and compiled, timed interleaved
        reset_peak_memory(b.device)
        cases = {'': make(False), '/compiled': make(True)}
        for sfx, (dt, mfu) in b.paired({k: v[:2] for k, v in cases.items()}, b.iters).items():
            b.record(key + sfx, name + (', compiled' if sfx else ''), samples, cases[sfx][1], dt, peak_memory_mib(b.device),
                     'eager and compiled timed in alternating rounds', mfu=mfu)
    for p in SCAN_TOK:
        pair(f'tok/{p}/CLIP+SSL+AE', f'VTP-{p} CLIP+SSL+AE step', a.batch, lambda c, p=p: b.make_tokenizer_step(p, 'CLIP+SSL+AE', a.batch, a.scale, c))
        c = vtp_config(p)
        table.append((f'VTP-{p} CLIP+SSL+AE step', c.vision_embed_dim, f'{c.vision_num_heads} x {c.vision_embed_dim // c.vision_num_heads}',
                      f'tok/{p}/CLIP+SSL+AE'))
    for p, o in SCAN_DIT:
        name = p + ''.join(f', {k}={v}' for k, v in o.items())
        pair(f'dit/{name}', f'LightningDiT-{name} step', a.dit_batch, lambda c, p=p, o=o: b.make_dit_step(p, a.dit_batch, c, **o))
        c = dit_config(p, **o)
        table.append((f'LightningDiT-{name} step', c['hidden_size'], f"{c['num_heads']} x {c['hidden_size'] // c['num_heads']}", f'dit/{name}'))
    return table


def width_scan_table(b: Bench, table: list) -> list:
    "Markdown table of the width scan (after `finish_peak`: on CUDA it updates every row's MFU)."
    R = b.rows
    out = ['| step | width | heads x head dim | MFU eager | MFU compiled | compiled / eager |', '|---|---:|---|---:|---:|---:|']
    for name, w, heads, key in table:
        e, c = R[key], R[key + '/compiled']
        out.append(f"| {name} | {w} | {heads} | {e['mfu']:.1%} | {c['mfu']:.1%} | {c['samples_per_s'] / e['samples_per_s']:.2f} |")
    r = R['ref/vit_ti4']
    out += ['', f"Reference, same run: {r['name']}: {r['mfu']:.1%} MFU (eager)."]
    return out


HOST_STEP = dict(samples_per_s=995.6, batch=256,
                 what='paper_S CLIP+SSL+AE step, compiled blocks, H200, per-GPU batch 256 (figures/benchmarks_cuda.md)')
CPU_FLAGS = ('avx2', 'avx512_bf16', 'amx_bf16')


def cpu_flags() -> str:
    "The model name and the avx2 / avx512_bf16 / amx_bf16 flags of this host's CPU, from /proc/cpuinfo."
    try: info = Path('/proc/cpuinfo').read_text().splitlines()
    except OSError: return platform.processor() or platform.machine()
    name = next((l.split(':', 1)[1].strip() for l in info if l.startswith('model name')), '?')
    flags = set(next((l.split(':', 1)[1].split() for l in info if l.startswith('flags')), []))
    return name + ' (' + ', '.join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS) + ')'


def host_scan(a) -> list:
    "Per-rank host time of the iBOT masks and batch indices of one step, vectorised per rank vs the global-batch loop."
    from vtp_nbdev.data import block_masks, block_masks_loop, stream_key
    from vtp_nbdev.runs import batch_indices, epoch_permutation
    b_ssl, b_clip, n, grid = a.host_ssl, a.host_clip, a.dataset_size, (16, 16)       # paper_S: 256 px, patch 16
    worlds = [int(w) for w in a.host_worlds.split(',')]
    loop_n = 8 if a.quick else 64                                     # masks of the reference loop per round
    def old_indices(step):                                            # the permutation drawn afresh every step
        out, pos = [], step * b_clip
        while len(out) < b_clip:
            epoch, off = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 + epoch))
            take = perm[off:off + b_clip - len(out)].tolist()
            out += take
            pos += len(take)
        return out
    t = time.perf_counter(); epoch_permutation.cache_clear(); epoch_permutation(n, 1, 0)
    perm_s = time.perf_counter() - t                                  # paid once per epoch
    ts = {k: [] for k in ('loop_mask', 'old_idx', *[f'mask{w}' for w in worlds], *[f'idx{w}' for w in worlds])}
    for r in range(a.host_rounds):
        cases = [('loop_mask', lambda: block_masks_loop(loop_n, grid, generator=torch.Generator().manual_seed(r))),
                 ('old_idx', lambda: old_indices(1))]
        for w in worlds:
            b = b_ssl // w
            ids = (torch.arange(2)[:, None] * b_ssl + (w - 1) + w * torch.arange(b)).flatten()   # the last rank's rows
            cases += [(f'mask{w}', lambda ids=ids: block_masks(ids, grid, key=stream_key(0, r))),
                      (f'idx{w}', lambda w=w: batch_indices(1, b_clip, n, 1, w - 1, w))]
        for k, fn in (cases if r % 2 else cases[::-1]):               # interleaved, alternating order
            t = time.perf_counter(); fn(); ts[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in ts.items()}
    loop_s = med['loop_mask'] / loop_n * 2 * b_ssl                   # every rank drew the global batch's masks
    steps_per_epoch = n / b_clip
    rows = []
    for w in worlds:
        step_s = b_clip / w / HOST_STEP['samples_per_s']
        new = med[f'mask{w}'] + med[f'idx{w}'] + perm_s / steps_per_epoch
        old = loop_s + med['old_idx']
        cells = [w, b_clip // w, 2 * b_ssl // w, f"{med[f'mask{w}'] * 1e3:.1f}", f"{med[f'idx{w}'] * 1e3:.2f}",
                 f'{new * 1e3:.1f}', f'{old * 1e3:,.0f}', f'{step_s * 1e3:,.0f}', f'**{new / step_s:.2%}**',
                 f'{old / step_s:.0%}']
        rows.append('| ' + ' | '.join(map(str, cells)) + ' |')
        print(rows[-1], flush=True)
    notes = [f"Reference (global): {loop_n} masks of the scalar loop `block_masks_loop` timed per round "
             f"({med['loop_mask'] / loop_n * 1e3:.2f} ms per mask), extrapolated to the {2 * b_ssl} masks of the "
             f"global batch, as a rank drawing the whole batch's masks would; its indices: `torch.randperm({n:,})` every step "
             f"({med['old_idx'] * 1e3:.0f} ms). Per rank: the rank's own masks and the cached epoch permutation's slice; "
             f"its one draw per "
             f"epoch ({perm_s * 1e3:.0f} ms, {steps_per_epoch:.0f} steps per epoch) is added to the total spread over "
             "the epoch's steps."]
    return rows, notes


def report_host_scan(a, cmd, dev, load0, t_start):
    "Run the host scan and write its report."
    rows, notes = host_scan(a)
    load1, wall = os.getloadavg(), time.time() - t_start
    print(f'done in {wall:.0f} s; load average {load0[0]:.2f} -> {load1[0]:.2f}', flush=True)
    if not a.out: return rows
    step = HOST_STEP
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    lines = ['# Host time per step: iBOT masks and batch indices (cpu)', '', *([f'> {a.note}', ''] if a.note else []),
             f"Command: `{cmd}` ({wall:.0f} s), {when}  ", f"Host CPU: {cpu_flags()}; {machine(dev)}.  ",
             f"1-minute load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end "
             f"(on {os.cpu_count()} logical CPUs).", '',
             f"The paper's batches (`batch_ssl` {a.host_ssl:,}, `batch_clip` {a.host_clip:,}) over `world` ranks; each "
             "rank draws the iBOT masks (16x16 patch grid, 2 global crops) and the dataset indices of its share of a "
             f"step on a dataset of {a.dataset_size:,} samples. Medians of {a.host_rounds} interleaved rounds "
             "(alternating order) on this host. The step time per rank is its local `batch_clip` / "
             f"{step['samples_per_s']} samples/s, the {step['what']}; for local batches above {step['batch']} it is "
             "extrapolated linearly. The masks and indices are timed on this host's CPU, not on the GPU machine's "
             "host (an Intel Xeon there).", '', *notes, '',
             '| world | local batch_clip | masks per rank | masks ms | indices ms | total ms | global reference ms | step ms | '
             'total / step | reference / step |', '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|', *rows]
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True); out.write_text('\n'.join(lines) + '\n')
    print('wrote', out)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--compile', action='store_true', help='CUDA: compile every step; CPU: add compiled rows beside the eager ones (tokenizer blocks as `pretrain(compile=True)`, the DiT as `train_dit(compile=True)`, sampling)')
    p.add_argument('--tok-presets', help='comma-separated tokenizer presets (default: S,tiny on CPU; paper_S,paper_B,paper_L on CUDA)')
    p.add_argument('--dit-presets', help='comma-separated LightningDiT presets (default: S on CPU; B/1,XL/1 on CUDA)')
    p.add_argument('--batch', type=int, help='tokenizer batch (default 64 on CPU, 32 per GPU)')
    p.add_argument('--dit-batch', type=int, help='DiT training batch (default 64)')
    p.add_argument('--sample-n', type=int, default=1000); p.add_argument('--sample-steps', type=int, default=50)
    p.add_argument('--sample-batch', type=int, default=0, help='latents per batched ODE solve (0: the fastest of 64/256/1000, probed)')
    p.add_argument('--sample-tok', help='tokenizer preset that decodes the samples (default tiny on CPU, paper_S on CUDA)')
    p.add_argument('--iters', type=int, default=5); p.add_argument('--threads', type=int, default=0)
    p.add_argument('--no-peers', action='store_true'); p.add_argument('--no-sampling', action='store_true')
    p.add_argument('--width-scan', action='store_true', help='CPU: MFU against width instead of the default rows (tokenizer presets tiny/S/B/L, DiT 64-384 wide, eager and compiled) -> figures/benchmarks_width.md')
    p.add_argument('--host-scan', action='store_true',
                   help="per-rank host time of a step's iBOT masks and batch indices at the paper's batches over "
                        "simulated world sizes, vectorised vs the global-batch loop -> figures/benchmarks_host.md")
    p.add_argument('--host-ssl', type=int, default=4096); p.add_argument('--host-clip', type=int, default=16384)
    p.add_argument('--host-worlds', default='1,2,8,64'); p.add_argument('--host-rounds', type=int, default=5)
    p.add_argument('--dataset-size', type=int, default=1_281_167,
                   help='--host-scan: samples in the dataset (default: ImageNet-1k train)')
    p.add_argument('--quick', action='store_true', help='tiny sizes and 1 iteration: checks that every row runs (seconds)')
    p.add_argument('--out', help="markdown report (default figures/benchmarks.md, figures/benchmarks_cuda.md with --device cuda; '' = none)")
    p.add_argument('--note', default='', help='a sentence written under the title of the report (e.g. about the machine load)')
    a = p.parse_args(argv)
    if a.device == 'cuda' and not torch.cuda.is_available():
        p.error(f"--device cuda: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False). "
                "Run the GPU benchmark on a machine with a CUDA GPU; here use --device cpu.")
    d = DEFAULTS[a.device]
    if a.quick:
        d = {**d, 'tok_presets': 'tiny', 'dit_presets': 'tiny', 'batch': 8, 'dit_batch': 8, 'sample_tok': 'tiny'}
        a.iters, a.sample_n, a.sample_steps, a.sample_batch = 1, 16, 2, 8
    for k in ('tok_presets', 'dit_presets', 'batch', 'dit_batch', 'sample_tok'):
        if getattr(a, k) is None: setattr(a, k, d[k])
    a.scale = d['scale']
    if a.width_scan and a.device != 'cpu': p.error('--width-scan measures the CPU presets: use it with --device cpu')
    if a.quick and a.host_scan: a.host_ssl, a.host_clip, a.host_rounds, a.dataset_size = 64, 256, 1, 10_000
    if a.out is None and a.host_scan: a.out = 'figures/benchmarks_host.md'
    if a.out is None: a.out = 'figures/benchmarks_cuda.md' if a.device == 'cuda' else 'figures/benchmarks_width.md' if a.width_scan else 'figures/benchmarks.md'
    return a


def main(argv=None):
    a = parse_args(argv)
    args = list(sys.argv[1:] if argv is None else argv)
    if '--note' in args: i = args.index('--note'); args[i:i + 2] = ['--note', '"..."']      # the note is printed above
    cmd = ' '.join(['python benchmarks/bench.py', *args])
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    load0 = os.getloadavg(); t_start = time.time()
    if a.host_scan: return report_host_scan(a, cmd, dev, load0, t_start)
    peak = matmul_peak(dev)
    print(f'fp32 matmul peak {peak / 1e9:.1f} GFLOP/s', flush=True)
    peaks = f"fp32 matmul peak **{peak / 1e9:.1f} GFLOP/s**"
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False
        peak = matmul_peak(dev, torch.bfloat16)
        peaks += f", bf16 matmul peak **{peak / 1e12:.1f} TFLOP/s** (the MFU denominator: steps run under bf16 autocast)"
    b = Bench(dev, peak, a.iters, a.compile); b.peak0 = peak
    if a.width_scan: return report_width_scan(b, a, cmd, dev, load0, t_start, peaks)
    if dev.type == 'cpu': b.reference_vit(a.batch)
    for k, preset in enumerate(a.tok_presets.split(',')):
        for losses in ('CLIP+SSL+AE', 'AE'):
            both = a.compile and dev.type == 'cpu' and k == 0                  # CPU: the first preset eager and compiled
            for compiled in ((False, True) if both else (a.compile and dev.type == 'cuda',)):
                tr, data = b.tokenizer_step(preset, losses, a.batch, a.scale, compiled)
                if losses == 'CLIP+SSL+AE' and not compiled and not a.no_peers: b.peers(tr, data, preset)
                del tr
    for preset in a.dit_presets.split(','):
        for compiled in ((False, True) if a.compile and dev.type == 'cpu' else (a.compile,)):   # CPU: eager and compiled side by side
            b.dit_step(preset, a.dit_batch, compiled)
            if not a.no_sampling: b.sampling(preset, a.sample_tok, a.sample_n, a.sample_steps, a.sample_batch, compiled)
    drift = finish_peak(b, torch.bfloat16 if dev.type == 'cuda' else torch.float32, 'bf16' if dev.type == 'cuda' else 'fp32')
    load1, wall = os.getloadavg(), time.time() - t_start
    print(f'done in {wall:.0f} s; load average {load0[0]:.2f} -> {load1[0]:.2f}', flush=True)
    if not a.out: return b
    lines = [f"# Benchmarks ({a.device})", '', *([f'> {a.note}', ''] if a.note else []),
             f"Command: `{cmd}` ({wall:.0f} s)  ",
             f"Machine: {machine(dev)}; {peaks}; {drift}.  ",
             f"1-minute load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end (on {os.cpu_count()} logical CPUs).", '',
             f'MFU = FLOPs counted by `torch.utils.flop_counter` / time / {PEAK_WORDS[b.local_peak]}. Memory: peak RSS of the process '
             'during the row on CPU, peak allocated on CUDA. Sampling rows: samples/s counts latents (or images) per second of that stage.', '',
             *rows_table(b, torch.cuda.get_device_name(dev) if dev.type == 'cuda' else None)]
    lines += ['', '## vs targets', '', '| target | wanted | measured | met |', '|---|---|---|---|', *targets_table(b, a)]
    if dev.type == 'cpu': lines += ['', 'The GPU benchmark of the paper presets (`python benchmarks/bench.py --device cuda [--compile]`: '
                                    'bf16 autocast, `paper_S/B/L` tokenizer steps, LightningDiT-B/1 and XL/1) writes `figures/benchmarks_cuda.md`.']
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True); out.write_text('\n'.join(lines) + '\n')
    print('wrote', out)
    return b


def report_width_scan(b: Bench, a, cmd, dev, load0, t_start, peaks):
    "Run the width scan and write its report."
    table = width_scan(b, a)
    drift = finish_peak(b, torch.float32, 'fp32')
    table = width_scan_table(b, table)
    load1, wall = os.getloadavg(), time.time() - t_start
    print(f'done in {wall:.0f} s; load average {load0[0]:.2f} -> {load1[0]:.2f}', flush=True)
    if not a.out: return b
    lines = ['# MFU against model width (cpu)', '', *([f'> {a.note}', ''] if a.note else []),
             f"Command: `{cmd}` ({wall:.0f} s)  ", f"Machine: {machine(dev)}; {peaks}; {drift}.  ",
             f"1-minute load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end (on {os.cpu_count()} logical CPUs).", '',
             f'Batch {a.batch} (tokenizer), {a.dit_batch} (DiT); compiled = blocks compiled as `pretrain(compile=True)`, the DiT as '
             '`train_dit(compile=True)`, the two timed in alternating rounds (after compilation and two warm-up steps). MFU = FLOPs counted by '
             '`torch.utils.flop_counter` / time / the larger of the matmul-peak probes just before and just after that round, the median '
             'over rounds (the shared host drifts; the reference row: against the probes around it).', '', *table]
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True); out.write_text('\n'.join(lines) + '\n')
    print('wrote', out)
    return b


if __name__ == '__main__':
    main()
