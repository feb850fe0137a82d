"""Own captioned data, end to end at 64 px: tar shards -> tokenizer pre-training -> latents -> unconditional DiT ->
samples, timed, on the CPU.

The data is built the way a user brings theirs: the first `--n-images` Fashion-MNIST training images (Debian's
`dataset-fashion-mnist`, installed by `make setup`) upsampled to 64 px (bicubic), written as PNG files with a caption
each (`a <tone> <class name>`, 30 distinct captions) in a CSV, and packed into a webdataset-style tar shard with
`data_prep/make_shards.py`. Then, on the shard's train split:
- pre-training: the `tiny` tokenizer at `image_size=64` with the CPU testbed's patch 8 (an 8x8 grid of d=16 latents;
  patch 4 would give 16x16 latents and a 4x more expensive DiT);
- `extract_latents` (with flips), an unconditional `tiny` LightningDiT (EMA) on them, and `sample_images`.
The sample grid (samples above, real training images below) goes to `figures/own_data_samples.png`; the settings,
each stage's wall time, the machine (CPU model, threads, load) and a recognisability check go to
`figures/own_data.md`. The check reads samples and real images with the built-in Fashion-MNIST reference CNN (images
resized to 28 px and zero-padded to 32, as its training images): the spread of its predicted classes, and the FD of
the samples to real training images next to the FD of as many other real training images (the floor).

    python benchmarks/own_data_generation.py    # one CPU thread: 34 minutes on a shared, loaded host (own_data.md)
    python benchmarks/own_data_generation.py --quick         # a few steps of everything: checks that it runs
"""
from __future__ import annotations
import argparse, csv, json, os, platform, sys, time
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vtp_nbdev.config import get_settings, setup_threads
from vtp_nbdev.data import read_idx, fashion_mnist_dir, FASHION_MNIST_FILES, FASHION_MNIST_CLASSES
from vtp_nbdev.eval_reconstruction import evaluate_tokenizer
from vtp_nbdev.fid import load_reference_extractor, fidelity_metrics
from vtp_nbdev.flow import DiTTrainConfig, train_dit, sample_images
from vtp_nbdev.latents import extract_latents
from vtp_nbdev.pretrain import PretrainConfig, pretrain

sys.path.insert(0, str(ROOT/'data_prep'))
from make_shards import make_shards

TONES = ('dark', 'grey', 'bright')


def cpu_model() -> str:
    "The host CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def load_average() -> str:
    "The 1/5/15-minute load averages."
    return ' / '.join(f'{x:.2f}' for x in os.getloadavg())


def recorded_seconds(run: Path) -> float:
    "The time a run recorded: `time_s` of its last `metrics.jsonl` row (training), else `seconds` in `done.json`."
    if (run/'metrics.jsonl').is_file():
        return float(json.loads((run/'metrics.jsonl').read_text().splitlines()[-1])['time_s'])
    return float(json.loads((run/'done.json').read_text())['seconds'])


def caption_of(img: np.ndarray, label: int, tone_edges) -> str:
    "`a <tone> <class>`: the tone is the tercile of the mean brightness of the garment's lit pixels."
    lit = img[img > 30]
    tone = TONES[int(np.searchsorted(tone_edges, lit.mean() if lit.size else 0))]
    return f'a {tone} {FASHION_MNIST_CLASSES[label].lower()}'


def write_user_data(folder: Path, n: int, res: int) -> Path:
    "PNG files + `pairs.csv` of the first `n` Fashion-MNIST training images at `res` px, packed as tar shards."
    d = fashion_mnist_dir()
    x, y = (read_idx(d/f) for f in FASHION_MNIST_FILES['train'])
    x, y = x[:n], y[:n]
    means = np.array([im[im > 30].mean() for im in x])
    edges = np.quantile(means, [1 / 3, 2 / 3])
    (folder/'images').mkdir(parents=True, exist_ok=True)
    with open(folder/'pairs.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['path', 'caption'])
        for i, (im, label) in enumerate(zip(x, y)):
            big = Image.fromarray(im).resize((res, res), Image.BICUBIC).convert('RGB')
            big.save(folder/'images'/f'{i:05d}.png')
            w.writerow([f'images/{i:05d}.png', caption_of(im, int(label), edges)])
    make_shards(folder/'pairs.csv', folder/'shards', per_shard=1000)
    return folder/'shards'


def as_fashion_mnist(images: torch.Tensor) -> torch.Tensor:
    "uint8 images (n, 3, H, W) resized to 28 px and zero-padded to 32, as the Fashion-MNIST reference CNN reads them."
    x = F.interpolate(images.float(), size=(28, 28), mode='bilinear', antialias=True, align_corners=False)
    return F.pad(x.round().clamp(0, 255), (2, 2, 2, 2)).to(torch.uint8)


@torch.no_grad()
def fashion_mnist_reading(samples: torch.Tensor, real: torch.Tensor, real_other: torch.Tensor) -> dict:
    "Predicted-class counts of samples and real images, and FD_fashion_mnist of samples / other real images to real."
    net = load_reference_extractor('fashion_mnist')
    classes = {k: torch.bincount(net(as_fashion_mnist(x))['logits'].argmax(1), minlength=10).tolist()
               for k, x in (('samples', samples), ('real', real))}
    fd = {k: fidelity_metrics(as_fashion_mnist(x), as_fashion_mnist(real), 'fashion_mnist', metrics=('fd',))
          ['FD_fashion_mnist'] for k, x in (('samples', samples), ('real', real_other))}
    return dict(classes=classes, fd=fd)


def real_images(folder: Path, n: int) -> torch.Tensor:
    "The first `n` PNG files written by `write_user_data` as uint8 (n, 3, H, W)."
    arrs = [np.asarray(Image.open(folder/f'{i:05d}.png').convert('RGB')) for i in range(n)]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def image_grid(rows: list, pad: int = 2, gap: int = 8) -> Image.Image:
    "One image of uint8 batches (n, 3, H, W), each batch a block of 8 columns, blocks separated by `gap` pixels."
    blocks = []
    for x in rows:
        n, _, h, w = x.shape
        r = (n + 7) // 8
        canvas = np.full((r * (h + pad) + pad, 8 * (w + pad) + pad, 3), 255, np.uint8)
        for i, im in enumerate(x.permute(0, 2, 3, 1).numpy()):
            top, left = pad + (i // 8) * (h + pad), pad + (i % 8) * (w + pad)
            canvas[top:top + h, left:left + w] = im
        blocks.append(canvas)
    width = max(b.shape[1] for b in blocks)
    spacer = np.full((gap, width, 3), 160, np.uint8)
    out = [blocks[0]]
    for b in blocks[1:]:
        out += [spacer, b]
    return Image.fromarray(np.concatenate(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n-images', type=int, default=1500)
    p.add_argument('--res', type=int, default=64)
    p.add_argument('--patch', type=int, default=8, help='tokenizer patch size (latent grid = res / patch)')
    p.add_argument('--pretrain-steps', type=int, default=1000)
    p.add_argument('--dit-steps', type=int, default=2000)
    p.add_argument('--dit-lr', type=float, default=1e-3)
    p.add_argument('--dit-batch', type=int, default=64)
    p.add_argument('--sample-steps', type=int, default=50)
    p.add_argument('--timestep-shift', type=float, default=0.3)
    p.add_argument('--n-samples', type=int, default=256, help='samples drawn (the grid shows 64)')
    p.add_argument('--work', default=None, help='data and runs folder (default: <runs_dir>/own_data_example)')
    p.add_argument('--figures', default=None, help='default: the figures_dir setting')
    p.add_argument('--quick', action='store_true', help='a few steps of everything (checks that it runs)')
    a = p.parse_args(argv)
    if a.quick:
        a.n_images, a.pretrain_steps, a.dit_steps, a.sample_steps, a.n_samples = 200, 4, 4, 4, 32
    threads = setup_threads()
    s = get_settings()
    work = Path(a.work or s['runs_dir']/('own_data_quick' if a.quick else 'own_data_example'))
    figs = Path(a.figures or (work if a.quick else s['figures_dir']))
    figs.mkdir(parents=True, exist_ok=True)
    load_start, times, reused = load_average(), {}, []

    def stage(name, fn, cached: bool = False):
        print(f"[own data] {name} ...", flush=True)
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        if cached and recorded_seconds(out) > times[name]:         # a finished run found and reused
            times[name] = recorded_seconds(out)
            reused.append(name)
        print(f"[own data] {name}: {times[name]:.0f} s", flush=True)
        return out

    shards = stage('data (PNG + CSV + tar shard)', lambda: write_user_data(work/'data', a.n_images, a.res))
    data = {'source': str(shards), 'skip_bad': True}
    pcfg = PretrainConfig(preset='tiny', model={'image_size': a.res, 'vision_patch_size': a.patch},
                          steps=a.pretrain_steps, batch_clip=64, batch_ssl=16, batch_rec=16, n_local_crops=2, lr=2e-3,
                          warmup=0.1, log_every=50, ckpt_every=200, dataset='image_text', dataset_kwargs=data)
    run = stage('tokenizer pre-training', lambda: pretrain(pcfg, runs_dir=work/'runs', device='cpu'), True)
    ev = stage('tokenizer evaluation (test split)',
               lambda: evaluate_tokenizer(run/'final', 'image_text', dataset_kwargs=data, out=work/'metrics.json',
                                          device='cpu'))
    lat = stage('latents (train split + flips)',
                lambda: extract_latents(run/'final', 'image_text', dataset_kwargs=data, runs_dir=work/'runs',
                                        device='cpu', progress=False), True)
    dcfg = DiTTrainConfig(preset='tiny', steps=a.dit_steps, batch=a.dit_batch, lr=a.dit_lr, ema_decay=0.999,
                          log_every=250, ckpt_every=1000)
    dit = stage('DiT training', lambda: train_dit(dcfg, lat, work/'runs', 'cpu'), True)
    imgs, _ = stage('sampling', lambda: sample_images(dit, run/'final', n=a.n_samples, steps=a.sample_steps,
                                                      timestep_shift=a.timestep_shift, device='cpu'))
    total = sum(times.values())
    real = real_images(work/'data'/'images', 2 * a.n_samples)
    image_grid([imgs[:64], real[:16]]).save(figs/'own_data_samples.png')
    read = fashion_mnist_reading(imgs, real[:a.n_samples], real[a.n_samples:])
    r, rec = ev['retrieval'], ev['reconstruction']
    lines = [
        '# Own captioned data at 64 px: pre-training, latents, unconditional DiT, samples (CPU)',
        '',
        f'Written by `python benchmarks/own_data_generation.py{" --quick" if a.quick else ""}`. Data: the first '
        f'{a.n_images} Fashion-MNIST training images, upsampled to {a.res} px, one caption each (`a <tone> <class>`), '
        'packed into a tar shard with `data_prep/make_shards.py`; every stage reads the shard\'s train split, the '
        'evaluation its test split.',
        '',
        f'- host: {cpu_model()}, {threads} torch thread(s); load average (1/5/15 min) {load_start} at the start, '
        f'{load_average()} at the end (other work on the machine slows every stage)',
        f'- torch {torch.__version__}, Python {platform.python_version()}',
        '',
        '| stage | settings | wall time (s) |',
        '|---|---|---|',
    ]
    settings = {
        'data (PNG + CSV + tar shard)': f'{a.n_images} images, {a.res} px',
        'tokenizer pre-training': f"`PretrainConfig(preset='tiny', model={{'image_size': {a.res}, 'vision_patch_size': "
                                  f"{a.patch}}}, steps={a.pretrain_steps}, batch_clip=64, batch_ssl=16, batch_rec=16, "
                                  "n_local_crops=2, lr=2e-3, warmup=0.1, dataset='image_text')`",
        'tokenizer evaluation (test split)': 'retrieval, PSNR / SSIM',
        'latents (train split + flips)': f'{a.res // a.patch}x{a.res // a.patch}x16 latents',
        'DiT training': f"`DiTTrainConfig(preset='tiny', steps={a.dit_steps}, batch={a.dit_batch}, lr={a.dit_lr}, "
                        "ema_decay=0.999)` (unconditional: captions carry no labels)",
        'sampling': f'{a.n_samples} samples, {a.sample_steps} Euler steps, timestep_shift={a.timestep_shift}',
    }
    lines += [f"| {k} | {settings[k]} | {v:.0f}{' *' if k in reused else ''} |" for k, v in times.items()]
    lines += [f'| **total** | | **{total:.0f}** |', '']
    if reused:
        lines += ['\\* a finished run of the same config was found and reused: the time the run recorded '
                  '(`time_s` in its `metrics.jsonl`, `seconds` in `done.json`) when an earlier invocation of this '
                  'script made it (under that invocation\'s load)', '']
    ret = ('retrieval: ' + ', '.join(f'{k} {100 * v:.1f}%' for k, v in r.items() if 'R@' in k)
           + f" over {r['n']} test pairs ({r['n_distinct_captions']} distinct captions; a hit: {r['hit']})") \
        if r else 'retrieval: none'
    lines += [f"Tokenizer on the test split: PSNR {rec['psnr']:.1f} dB, SSIM {rec['ssim']:.2f}; {ret}.", '',
              f"Samples (`figures/own_data_samples.png`: {min(64, a.n_samples)} samples above the grey bar, real "
              "training images below), read by the built-in Fashion-MNIST reference CNN (images resized to 28 px and "
              "zero-padded to 32, as its training images): predicted classes of the samples "
              f"{read['classes']['samples']}, of as many real training images {read['classes']['real']} (order: "
              f"{', '.join(FASHION_MNIST_CLASSES)}); FD_fashion_mnist of the {a.n_samples} samples to "
              f"{a.n_samples} real training images {read['fd']['samples']:.2f}, of {a.n_samples} other real "
              f"training images to the same ones {read['fd']['real']:.2f} (the floor at this sample size).", '']
    (figs/'own_data.md').write_text('\n'.join(lines))
    print('\n'.join(lines), flush=True)
    print(json.dumps(dict(times=times, total=total, **read)), flush=True)


if __name__ == '__main__':
    main()
