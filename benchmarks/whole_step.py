"Whole-step compile: eager, eager static buffer, compiled blocks, compiled step; paired interleaved rounds."
import argparse, copy, statistics, time
import torch
from vtp_nbdev.config import seed_everything, setup_threads
from vtp_nbdev.data import ShapesDataset
from vtp_nbdev.pretrain import PretrainConfig, VTPPretrainer, compile_blocks, make_optimizer, step_schedules


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--preset', default='tiny')
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--rounds', type=int, default=10)
    ap.add_argument('--steps', type=int, default=2, help='steps per variant per round')
    a = ap.parse_args()
    setup_threads()
    cfg = PretrainConfig(preset=a.preset, batch_clip=a.batch, batch_ssl=a.batch // 2, batch_rec=a.batch // 4,
                         n_local_crops=2, steps=1000)
    ds = ShapesDataset(size=4 * a.batch, context_length=32)
    batches = [torch.utils.data.default_collate([ds[i] for i in range(s * a.batch, (s + 1) * a.batch)])
               for s in range(4)]
    seed_everything(0)
    base = VTPPretrainer(cfg)
    runs = dict(eager=copy.deepcopy(base), static=copy.deepcopy(base), blocks=copy.deepcopy(base),
                step=copy.deepcopy(base))
    runs['static'].static = True                                       # eager, fixed-length masked-token buffer
    compile_blocks(runs['blocks'])
    runs['step'].compile_step()
    state = {k: dict(tr=tr, opt=make_optimizer(tr, cfg), step=0) for k, tr in runs.items()}

    def train(k, n):
        s = state[k]
        t0 = time.perf_counter()
        for _ in range(n):
            s['opt'].zero_grad(set_to_none=True)
            loss, _ = s['tr'](batches[s['step'] % 4], s['step'])
            loss.backward()
            s['opt'].step()
            s['tr'].net.update_teacher(step_schedules(cfg, s['step'])['momentum'])
            s['step'] += 1
        return (time.perf_counter() - t0) / n

    for k in runs:                                                      # compile and warm up
        t0 = time.perf_counter()
        train(k, 2)
        print(f'{k}: first 2 steps {time.perf_counter() - t0:.1f} s')
    times = {k: [] for k in runs}
    for r in range(a.rounds):
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]  # rotating order within each round
        for k in order:
            times[k].append(train(k, a.steps))
    q = lambda xs: statistics.quantiles(xs, n=4)
    for k in runs:
        print(f'{k}: median {1e3 * statistics.median(times[k]):.1f} ms/step')
    for k in ('static', 'blocks', 'step'):
        ratios = [e / c for e, c in zip(times['eager'], times[k])]
        lo, med, hi = q(ratios)
        print(f'speed-up {k}/eager: median {med:.3f} (quartiles {lo:.3f}-{hi:.3f}) over {a.rounds} rounds')
    for ref in ('static', 'blocks'):
        lo, med, hi = q([b / c for b, c in zip(times[ref], times['step'])])
        print(f'speed-up step/{ref}: median {med:.3f} (quartiles {lo:.3f}-{hi:.3f})')


if __name__ == '__main__':
    main()
