"Real tokenizer run against the bare step: where a short `pretrain` spends its wall time beyond forward/backward/AdamW."
import argparse, contextlib, os, statistics, tempfile, time
from collections import Counter, defaultdict
from pathlib import Path
import torch
import vtp_nbdev.data as vdata
import vtp_nbdev.loader as vloader
import vtp_nbdev.pretrain as vpre
import vtp_nbdev.runs as vruns
from vtp_nbdev.config import seed_everything, setup_threads
from vtp_nbdev.scaling import flops_per_step, scaling_config

MISSING = object()


class Timers:
    "Exclusive wall time per label: a timed call's time less that of the timed calls inside it."
    def __init__(self):
        self.total, self.calls, self.stack, self.patches = defaultdict(float), Counter(), [], []

    def timed(self, label: str, fn):
        "`fn` wrapped: its exclusive time goes to `label`."
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            self.stack.append(0.)
            try:
                return fn(*args, **kw)
            finally:
                dt = time.perf_counter() - t0
                inner = self.stack.pop()
                self.total[label] += dt - inner
                self.calls[label] += 1
                if self.stack:
                    self.stack[-1] += dt
        return wrapper

    def patch(self, owner, name: str, label: str):
        "Replace `owner.name` (a module function, a class's method) by its timed wrapper until `restore`."
        before = owner.__dict__.get(name, MISSING) if isinstance(owner, type) else getattr(owner, name)
        self.patches.append((owner, name, before))
        setattr(owner, name, self.timed(label, getattr(owner, name)))

    def restore(self):
        "Put every patched attribute back."
        for owner, name, before in reversed(self.patches):
            if before is MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, before)
        self.patches.clear()


class TimedIter:
    "An iterator whose `next` is timed (the batches generator of `fit`)."
    def __init__(self, it, timers: Timers, label: str):
        self.it, self.next = it, timers.timed(label, lambda: next(it))

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()


@contextlib.contextmanager
def instrumented(timers: Timers, captured: dict):
    "Time the parts of `fit` through the functions and methods it calls (nothing in the loop changes)."
    R = vpre.PretrainRecipe
    batches, optimizer, trainer = R.batches, R.optimizer, R.trainer

    def timed_batches(self, start, end):
        return TimedIter(batches(self, start, end), timers, 'data: batch_to, generator')

    def timed_optimizer(self, tr):
        opt = optimizer(self, tr)
        opt.step = timers.timed('step: AdamW', opt.step)
        captured.update(opt=opt)
        return opt

    def kept_trainer(self):
        captured.update(trainer=trainer(self), recipe=self)
        return captured['trainer']

    class TimedBar(vruns.tqdm):
        update = timers.timed('progress bar', vruns.tqdm.update)
        set_postfix = timers.timed('progress bar', vruns.tqdm.set_postfix)

    timers.patches.append((R, 'batches', MISSING))
    R.batches = timed_batches
    timers.patches.append((R, 'optimizer', MISSING))
    R.optimizer = timed_optimizer
    timers.patches.append((R, 'trainer', MISSING))
    R.trainer = timers.timed('startup: model', kept_trainer)
    timers.patches.append((vruns, 'tqdm', vruns.tqdm))
    vruns.tqdm = TimedBar
    for owner, name, label in [
            (R, 'setup', 'startup: dataset'), (R, 'step_flops', 'startup: FLOP count (one step)'),
            (R, 'schedule', 'loop: schedule'), (R, 'loss', 'step: forward + loss'),
            (R, 'after_step', 'step: EMA teacher'), (torch.Tensor, 'backward', 'step: backward'),
            (torch.nn.utils, 'clip_grad_norm_', 'step: grad norm'), (vruns, '_check_finite', 'loop: finite check'),
            (vloader.MaskCollate, '__call__', 'data: collate'), (vloader, 'ibot_masks', 'data: iBOT masks'),
            (vloader.StepSamples, '__getitems__', 'data: sample lookup'), (vdata.MemoDataset, '__getitem__',
                                                                       'data: sample lookup'),
            (vdata.VTPDataset, '__getitem__', 'data: normalise'), (vdata, 'tokenize', 'data: tokenize'),
            (vdata.ShapePairsDataset, 'raw', 'data: render'), (vdata.ShapesDataset, 'raw', 'data: render'),
            (vruns, 'append_jsonl', 'logging: metrics.jsonl'), (vruns, 'full_tensor', 'logging: values'),
            (vruns, 'save_rolling', 'checkpoints: rolling'), (vruns, 'save_shared_prefix', 'checkpoints: shared prefix (wsd)'),
            (R, 'save_final', 'end: final model'), (vruns, 'rewrite_jsonl', 'end: metrics files'),
            (vruns, '_csv', 'end: metrics files'), (vruns, 'prepare_run_dir', 'startup: run dir')]:
        timers.patch(owner, name, label)
    try:
        yield
    finally:
        timers.restore()


def bare_steps(recipe, trainer, opt, batch: dict, n: int) -> list:
    "Seconds of each of `n` model steps as `fit` runs them (schedule, forward, backward, clip, AdamW, EMA) on `batch`."
    out = []
    for step in range(n):
        t0 = time.perf_counter()
        sch = recipe.schedule(step)
        for g in opt.param_groups:
            g['lr'] = sch['lr']
        opt.zero_grad(set_to_none=True)
        recipe.loss(trainer, trainer, batch, step, contextlib.nullcontext())        # forward and backward
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), recipe.grad_clip)
        opt.step()
        recipe.after_step(trainer, step, sch)
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--losses', default='AE')
    ap.add_argument('--steps', type=int, default=600, help='the budget: this many steps of the cpu-scale config')
    ap.add_argument('--bench-steps', type=int, default=60, help='bare steps before and after the run')
    ap.add_argument('--no-progress', action='store_true')
    a = ap.parse_args()
    setup_threads()
    per_step = flops_per_step(scaling_config('cpu', a.losses, 0, flops=1))
    cfg = scaling_config('cpu', a.losses, 0, flops=a.steps * per_step)
    print(f'cpu {a.losses}: {cfg.steps} steps, batch_clip {cfg.batch_clip}, ssl {cfg.batch_ssl}, rec {cfg.batch_rec}, '
          f'log_every {cfg.log_every}, ckpt_every {cfg.ckpt_every}, schedule {cfg.schedule}, '
          f'num_workers {cfg.num_workers}, dataset {cfg.dataset} {cfg.dataset_kwargs}')
    with tempfile.TemporaryDirectory() as tmp:
        # bench before: a trainer and a batch of the same config, built as `fit` builds them
        pre = vpre.PretrainRecipe(cfg)
        pre.setup(torch.device('cpu'), 0, 1)
        seed_everything(cfg.seed)
        tr0 = pre.trainer()
        batch = pre.batch(0)
        before = bare_steps(pre, tr0, pre.optimizer(tr0), batch, a.bench_steps)
        del tr0
        timers, captured = Timers(), {}
        with instrumented(timers, captured):
            t0 = time.perf_counter()
            run = vpre.pretrain(cfg, runs_dir=Path(tmp), device='cpu', progress=not a.no_progress)
            wall = time.perf_counter() - t0
        assert (run/'done.json').exists()
        # bench after: the run's own trainer and optimiser, the same batch
        after = bare_steps(captured['recipe'], captured['trainer'], captured['opt'], batch, a.bench_steps)
    bench = statistics.median(before + after)
    real = wall / cfg.steps
    print(f'\nreal run: {wall:.1f} s wall for {cfg.steps} steps = {1e3 * real:.1f} ms/step')
    print(f'bare step (same config and batch): median {1e3 * statistics.median(before):.1f} ms before the run, '
          f'{1e3 * statistics.median(after):.1f} ms after ({a.bench_steps} steps each)')
    print(f'real / bench: {real / bench:.3f}\n')
    rows = sorted(timers.total.items(), key=lambda kv: -kv[1])
    print(f'| part | calls | s | ms/step | % of wall |\n|---|---|---|---|---|')
    for k, v in rows:
        print(f'| {k} | {timers.calls[k]} | {v:.2f} | {1e3 * v / cfg.steps:.2f} | {100 * v / wall:.1f} |')
    rest = wall - sum(timers.total.values())
    print(f'| loop and startup, untimed | | {rest:.2f} | {1e3 * rest / cfg.steps:.2f} | {100 * rest / wall:.1f} |')
    step = sum(v for k, v in timers.total.items() if k.startswith('step:')) + timers.total['loop: schedule']
    print(f'\nmodel step inside the run: {1e3 * step / cfg.steps:.1f} ms/step '
          f'({step / cfg.steps / bench:.3f} x the bare step)')
    for part in ('startup', 'data', 'logging', 'checkpoints', 'progress', 'end', 'loop'):
        s = sum(v for k, v in timers.total.items() if k.startswith(part))
        print(f'{part}: {s:.2f} s ({100 * s / wall:.1f} % of wall, {1e3 * s / cfg.steps:.2f} ms/step)')


if __name__ == '__main__':
    main()
