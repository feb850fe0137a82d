"""Train the frozen reference feature extractors used for FD / KID / IS / precision-recall (vtp_nbdev.fid).

One small CNN per built-in dataset (`RefCNN`, architecture in `vtp_nbdev.fid.REFERENCE_EXTRACTORS`):
- `shapes`: multi-head (20-class label = shape x colour, plus shape 5, colour 4, size 2, count 3, position 5),
  trained on procedurally generated train-split images, evaluated on the test split;
- `shape_pairs`: multi-head (20-class label, plus shape 5, colour 4, size 2, background 4), trained and evaluated the
  same way (train with `--dataset shape_pairs`; `all` trains `shapes` and `fashion_mnist` only);
- `fashion_mnist`: 10 classes, trained on our train split (official train minus the last 5000), evaluated on val
  and the official test set.
Inputs are ImageNet-normalised 32-px images built from uint8 pixels exactly as the metric pipeline does.
Training uses BatchNorm after every conv (AdamW, cosine schedule, summed cross-entropy over heads); it is folded into
the convolutions before saving, and the penultimate layer is rescaled so the features have unit RMS on training images
(KID's polynomial kernel assumes O(1) features; the logits are unchanged).
Deterministic: fixed seed and data order, fixed thread count (`--threads`, else the `threads` setting of settings.ini /
`VTP_THREADS`, else 2, the count the committed weights were written with; other thread counts may change the float
reduction order and so the bytes of the weights). Writes `<out>/<dataset>.safetensors` (+ a JSON report)
and prints the `REFERENCE_EXTRACTORS` entry (sha256) to paste into nbs/08_fid.ipynb.

    python data_prep/train_reference_extractor.py --dataset all      # a few minutes on 2 CPU cores
    python data_prep/train_reference_extractor.py --dataset shape_pairs --threads 1

Your own labelled images (`root/<class>/<images>`, or `root/train/<class>/...` with its own splits) train one the same
way: `--dataset image_folder --root DIR [--name NAME]` writes `<runs_dir>/reference/<NAME>.safetensors` (`runs_dir`
from settings.ini or `VTP_RUNS_DIR`; NAME defaults to the folder's name), its architecture and input size in the file's
metadata; pass that file as `extractor=` to `evaluate_tokenizer` (rFD labelled `FD_<NAME>`). Images are read at the
data's resolution (the short side of the first training image, rounded down to a multiple of 8) unless `--res` says
otherwise; images of another size are resized to it when measured (`vtp_nbdev.fid.resize_for_reference`). Accuracy
on the held-out split is printed and written beside the weights.

    python data_prep/train_reference_extractor.py --dataset image_folder --root ~/my_images --epochs 20
"""
from __future__ import annotations
import argparse, json, math, sys, time
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from PIL import Image
from vtp_nbdev.config import get_settings, seed_everything, setup_threads
from vtp_nbdev.data import (shapes_sample, shape_pairs_sample, SPLIT_OFFSETS, SHAPE_KINDS, COLOURS, SIZES, COUNTS,
                            POSITIONS, PAIR_BACKGROUNDS, read_idx, fashion_mnist_dir, FASHION_MNIST_FILES, get_dataset)
from vtp_nbdev.fid import RefCNN, REFERENCE_EXTRACTORS, REF_RES, sha256_file

ATTRS = dict(shape=SHAPE_KINDS, colour=tuple(COLOURS), size=SIZES, count=COUNTS, position=POSITIONS)
PAIR_ATTRS = dict(shape=SHAPE_KINDS, colour=tuple(COLOURS), size=SIZES, background=PAIR_BACKGROUNDS)
BUILTIN = ('shapes', 'fashion_mnist')                                    # what `--dataset all` trains
DEFAULTS = dict(shapes=dict(n_train=30_000, epochs=6), shape_pairs=dict(n_train=30_000, epochs=6),
                fashion_mnist=dict(epochs=5))


def shapes_arrays(split: str, n: int, seed: int = 0, sample=shapes_sample, attrs=ATTRS):
    "uint8 images (n, 3, 32, 32) and int64 targets per head for `n` procedural images of `split` (`sample`, `attrs`)."
    imgs, tg = np.empty((n, 32, 32, 3), np.uint8), {k: np.empty(n, np.int64) for k in ('logits', *attrs)}
    for i in range(n):
        img, _, label, a = sample(SPLIT_OFFSETS[split] + i, seed, 32)
        imgs[i] = img; tg['logits'][i] = label
        for k, vals in attrs.items(): tg[k][i] = vals.index(a[k])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), {k: torch.from_numpy(v) for k, v in tg.items()}


def fmnist_arrays(split: str, n_val: int = 5000):
    "uint8 images (n, 3, 32, 32) (28 px zero-padded to 32, grey replicated to RGB) and labels."
    d = fashion_mnist_dir()
    x, y = (read_idx(d/f) for f in FASHION_MNIST_FILES['test' if split == 'test' else 'train'])
    if split == 'train': x, y = x[:-n_val], y[:-n_val]
    elif split == 'val': x, y = x[-n_val:], y[-n_val:]
    x = torch.from_numpy(np.pad(x, ((0, 0), (2, 2), (2, 2)))).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return x, {'logits': torch.from_numpy(y.astype(np.int64))}


def folder_resolution(root) -> int:
    "The short side of the first readable training image of an image folder, rounded down to a multiple of 8."
    ds = get_dataset('image_folder', 'train', root=root)
    for f, _ in ds.files:
        try:
            with Image.open(f) as im:
                return max(8, min(im.size) // 8 * 8)
        except OSError:
            continue
    raise ValueError(f"image_folder {root}: no readable training image to take the resolution from; pass --res")


def folder_arrays(root, split: str, res: int = REF_RES):
    "uint8 images (n, 3, res, res), labels and classes of an `image_folder` split (bad files skipped with a warning)."
    ds = get_dataset('image_folder', split, res=res, root=root, skip_bad=True)
    imgs, labels = zip(*((img, label) for img, _, label in (ds.raw(i) for i in range(len(ds)))))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, {'logits': torch.tensor(labels, dtype=torch.int64)}, ds.classes


def folder_arch(n_classes: int, res: int = REF_RES) -> dict:
    "The reference architecture of the built-in datasets with one head over the folder's classes, at `res` px."
    return dict(widths=(16, 32, 64), feat_dim=128, heads=(('logits', n_classes),), res=res)


@torch.no_grad()
def evaluate(net, x, tg, bs=1000) -> dict:
    "Accuracy of every head."
    net.eval()
    correct = {k: 0 for k in tg}
    for i in range(0, len(x), bs):
        out = net(x[i:i + bs])
        for k in tg: correct[k] += (out[k].argmax(1) == tg[k][i:i + bs]).sum().item()
    return {k: c / len(x) for k, c in correct.items()}


def with_batchnorm(net: RefCNN) -> RefCNN:
    "Insert BatchNorm after every conv of the body (training only: folded away by `fold_batchnorm`)."
    mods = []
    for m in net.body:
        mods.append(m)
        if isinstance(m, nn.Conv2d): mods.append(nn.BatchNorm2d(m.out_channels))
    net.body = nn.Sequential(*mods)
    return net


@torch.no_grad()
def fold_batchnorm(net: RefCNN, arch: dict) -> RefCNN:
    "The BatchNorm-free `RefCNN` computing the same function (eval mode) as a `with_batchnorm` network."
    out = RefCNN(**arch)
    pairs = [(m, net.body[i + 1]) for i, m in enumerate(net.body) if isinstance(m, nn.Conv2d)]
    convs = [m for m in out.body if isinstance(m, nn.Conv2d)]
    for (c, bn), dst in zip(pairs, convs, strict=True):
        s = bn.weight / (bn.running_var + bn.eps).sqrt()                     # (C,)
        dst.weight.copy_(c.weight * s[:, None, None, None]); dst.bias.copy_((c.bias - bn.running_mean) * s + bn.bias)
    out.fc.load_state_dict(net.fc.state_dict()); out.heads.load_state_dict(net.heads.state_dict())
    return out.eval()


@torch.no_grad()
def calibrate_feature_scale(net: RefCNN, x: torch.Tensor, n: int = 5000) -> float:
    "Scale the penultimate layer so features have unit RMS on the first `n` training images; logits unchanged."
    f = torch.cat([net.features(x[i:i + 1000]) for i in range(0, min(n, len(x)), 1000)])
    s = 1 / f.pow(2).mean().sqrt().item()                                 # ReLU(s z) = s ReLU(z) for s > 0
    net.fc.weight.mul_(s); net.fc.bias.mul_(s)
    for h in net.heads.values(): h.weight.div_(s)
    return s


def train(name: str, x, tg, epochs: int, bs: int, lr: float, seed: int, augment_flip: bool, arch: dict | None = None):
    "AdamW + cosine schedule, summed cross-entropy over heads, BatchNorm folded at the end; returns the network."
    seed_everything(seed)
    arch = arch or REFERENCE_EXTRACTORS[name][2]
    bs = min(bs, len(x))
    net = with_batchnorm(RefCNN(**arch))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    steps, step = epochs * (len(x) // bs), 0
    t0 = time.time()
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            idx = perm[i:i + bs]
            xb = x[idx]
            if augment_flip:
                flip = torch.rand(len(xb), generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            for pg in opt.param_groups: pg['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            out = net(xb)
            loss = sum(F.cross_entropy(out[k], tg[k][idx]) for k in tg)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); step += 1
        print(f"  [{name}] epoch {ep + 1}/{epochs} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    folded = fold_batchnorm(net, arch)
    probe = x[:256]
    err = (folded(probe)['feat'] - net(probe)['feat']).abs().max().item()
    if err > 1e-3: raise RuntimeError(f"BatchNorm folding changed the features by {err}")
    return folded


def file_metadata(name: str, seed: int, arch: dict | None = None) -> dict:
    "One metadata entry (safetensors writes several keys in a run-dependent order, which would change the sha256)."
    arch = arch or REFERENCE_EXTRACTORS[name][2]
    return {'vtp_reference': json.dumps(dict(dataset=name, seed=seed, arch=arch), sort_keys=True)}


def train_folder(a) -> Path:
    "Train, save and report the reference network of a user's labelled image folder; returns the weights file."
    if a.root is None:
        raise SystemExit("--dataset image_folder needs --root DIR (DIR/<class>/<images>)")
    t0 = time.time()
    name = a.name or Path(a.root).resolve().name
    res = a.res or folder_resolution(a.root)
    print(f"[{name}] reading {a.root} at {res} px", flush=True)
    x, tg, classes = folder_arrays(a.root, 'train', res)
    try:
        evals = {'test': folder_arrays(a.root, 'test', res)[:2]}
    except ValueError as e:                                               # too few images for a held-out split
        print(f"[{name}] no held-out accuracy: {e}", flush=True)
        evals = {}
    arch = folder_arch(len(classes), res)
    net = train(name, x, tg, a.epochs or 20, 128, 2e-3, a.seed, augment_flip=True, arch=arch)
    scale = calibrate_feature_scale(net, x)
    out = Path(a.out or get_settings()['runs_dir']/'reference')
    out.mkdir(parents=True, exist_ok=True)
    path = out/f'{name}.safetensors'
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(path), metadata=file_metadata(name, a.seed, arch))
    report = dict(dataset=name, root=str(a.root), classes=list(classes), sha256=sha256_file(path), feature_scale=scale,
                  accuracy={s: evaluate(net, *xy) for s, xy in evals.items()}, n_train=len(x), epochs=a.epochs or 20,
                  res=res, seed=a.seed, threads=torch.get_num_threads(), seconds=round(time.time() - t0, 1),
                  torch=torch.__version__)
    (out/f'{name}.json').write_text(json.dumps(report, indent=2) + '\n')
    print(json.dumps(report, indent=2))
    print(f"use it with evaluate_tokenizer(..., extractor={str(path)!r})", flush=True)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default='all', choices=['all', 'image_folder', *REFERENCE_EXTRACTORS])
    p.add_argument('--root', default=None, help='image_folder: the folder of class sub-folders')
    p.add_argument('--name', default=None, help="image_folder: the extractor's name (default: the folder's name)")
    p.add_argument('--out', default=None,
                   help='default: data_prep/reference (built-in), <runs_dir>/reference (image_folder)')
    p.add_argument('--res', type=int, default=None,
                   help="image_folder: input size in px, a multiple of 8 (default: the images' own)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None,
                   help='default: the threads setting (settings.ini / VTP_THREADS), else 2')
    p.add_argument('--n-train', type=int, default=None, help='training images (default 30000)')
    p.add_argument('--n-test', type=int, default=5_000, help='shapes / shape_pairs test images')
    p.add_argument('--epochs', type=int, default=None, help='default: 6 (shapes, shape_pairs), 5 (fashion_mnist)')
    a = p.parse_args(argv)
    if a.res is not None and (a.res < 8 or a.res % 8):
        p.error(f"--res {a.res}: expected a positive multiple of 8 (the network pools three times by 2)")
    if a.res is not None and a.dataset != 'image_folder':
        p.error(f"--res is for --dataset image_folder; the built-in networks read {REF_RES} px")
    a.threads = a.threads or get_settings()['threads'] or 2
    setup_threads(a.threads)
    if a.dataset == 'image_folder':
        return train_folder(a)
    out = Path(a.out or ROOT/'data_prep'/'reference')
    out.mkdir(parents=True, exist_ok=True)
    for name in (BUILTIN if a.dataset == 'all' else [a.dataset]):
        t0 = time.time()
        epochs = a.epochs or DEFAULTS[name]['epochs']
        if name == 'shapes':
            n_train = a.n_train or DEFAULTS[name]['n_train']
            x, tg = shapes_arrays('train', n_train, seed=0)
            evals = {'test': shapes_arrays('test', a.n_test, seed=0)}
            print(f"[shapes] generated {n_train} + {a.n_test} images in {time.time() - t0:.0f} s", flush=True)
            net = train(name, x, tg, epochs, 128, 2e-3, a.seed, augment_flip=False)  # flips swap left/right
        elif name == 'shape_pairs':
            n_train = a.n_train or DEFAULTS[name]['n_train']
            x, tg = shapes_arrays('train', n_train, 0, shape_pairs_sample, PAIR_ATTRS)
            evals = {'test': shapes_arrays('test', a.n_test, 0, shape_pairs_sample, PAIR_ATTRS)}
            print(f"[shape_pairs] generated {n_train} + {a.n_test} images in {time.time() - t0:.0f} s", flush=True)
            net = train(name, x, tg, epochs, 128, 2e-3, a.seed, augment_flip=True)  # every shape is mirror-symmetric
        else:
            x, tg = fmnist_arrays('train')
            evals = {'val': fmnist_arrays('val'), 'test': fmnist_arrays('test')}
            net = train(name, x, tg, epochs, 128, 2e-3, a.seed, augment_flip=True)
        scale = calibrate_feature_scale(net, x)                     # KID's polynomial kernel assumes O(1) features
        acc = {split: evaluate(net, *xy) for split, xy in evals.items()}
        path = out/f'{name}.safetensors'
        sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        save_file(sd, str(path), metadata=file_metadata(name, a.seed))
        sha = sha256_file(path)
        report = dict(dataset=name, sha256=sha, bytes=path.stat().st_size, accuracy=acc, feature_scale=scale,
                      seed=a.seed, threads=a.threads, n_train=len(x), epochs=epochs, seconds=round(time.time() - t0, 1),
                      torch=torch.__version__)
        (out/f'{name}.json').write_text(json.dumps(report, indent=2) + '\n')
        print(json.dumps(report, indent=2))
        print(f"REFERENCE_EXTRACTORS[{name!r}] sha256 = {sha!r}", flush=True)


if __name__ == '__main__':
    main()
