"Whole-step compile (tokenizer or DiT): eager against compiled variants in paired interleaved rounds."
import argparse, copy, statistics, time
import torch
from vtp_nbdev.config import seed_everything, setup_threads
from vtp_nbdev.data import ShapesDataset
from vtp_nbdev.pretrain import PretrainConfig, VTPPretrainer, compile_blocks, make_optimizer, step_schedules


def paired_rounds(train, names, rounds: int, steps: int) -> dict:
    "Seconds per step of each variant in every round (`train(name, n)` -> s/step; rotating order within a round)."
    times = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            times[k].append(train(k, steps))
    return times


def speedup(times: dict, ref: str, k: str) -> str:
    "Median (quartiles) of the per-round ratios time[ref] / time[k]."
    lo, med, hi = statistics.quantiles([a / b for a, b in zip(times[ref], times[k])], n=4)
    return f'median {med:.3f} (quartiles {lo:.3f}-{hi:.3f})'


def dit_main(a):
    "Eager, compile=True (the forward) and compile='step' (the whole loss step) DiT training steps."
    from vtp_nbdev.dit import dit_config
    from vtp_nbdev.flow import DiTTrainConfig, DiTTrainer, step_draws
    C, H = a.channels, a.grid
    cfg = DiTTrainConfig(preset=a.preset, batch=a.batch)
    args = dit_config(a.preset, in_channels=C, input_size=H, num_classes=20)
    g = torch.Generator().manual_seed(0)
    batches = []
    for s in range(4):
        d = step_draws(cfg, s, a.batch, (C, H, H), args['class_dropout_prob'])
        x1, y = torch.randn(a.batch, C, H, H, generator=g), torch.randint(0, 20, (a.batch,), generator=g)
        batches.append(dict(x1=x1, y=y, t=d['t'], x0=d['noise'], drop=d['drop']))
    seed_everything(0)
    base = DiTTrainer(args, cfg)
    runs = dict(eager=copy.deepcopy(base), forward=copy.deepcopy(base), step=copy.deepcopy(base).compile_step())
    nets = dict(eager=runs['eager'].model, forward=torch.compile(runs['forward'].model), step=runs['step'].model)
    opt = lambda tr: torch.optim.AdamW(tr.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=0., fused=True)
    state = {k: dict(tr=tr, opt=opt(tr), step=0, losses=[]) for k, tr in runs.items()}

    def train(k, n):
        s = state[k]
        t0 = time.perf_counter()
        for _ in range(n):
            s['opt'].zero_grad(set_to_none=True)
            loss, _ = s['tr'].step_loss(nets[k], **batches[s['step'] % 4])
            loss.backward()
            s['opt'].step()
            s['tr'].update_ema(min(cfg.ema_decay, (1 + s['step']) / (10 + s['step'])))
            s['step'] += 1
            if s['step'] <= 3:
                s['losses'].append(loss.item())
        return (time.perf_counter() - t0) / n

    print(f'DiT {a.preset}: {sum(p.numel() for p in base.model.parameters()) / 1e6:.2f} M parameters, latents '
          f'({C}, {H}, {H}), batch {a.batch}')
    for k in runs:                                                      # compile and warm up: the same 3 steps
        t0 = time.perf_counter()
        train(k, 3)
        print(f'{k}: first 3 steps {time.perf_counter() - t0:.1f} s, losses {state[k]["losses"]}')
    for k in ('forward', 'step'):
        diff = max(abs(x - y) for x, y in zip(state['eager']['losses'], state[k]['losses']))
        print(f'{k}: max |loss - eager loss| over the first 3 steps {diff:.2e}')
    times = paired_rounds(train, list(runs), a.rounds, a.steps)
    for k in runs:
        print(f'{k}: median {1e3 * statistics.median(times[k]):.1f} ms/step')
    for k in ('forward', 'step'):
        print(f'speed-up {k}/eager: {speedup(times, "eager", k)} over {a.rounds} rounds')
    print(f'speed-up step/forward: {speedup(times, "forward", "step")}')


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--model', choices=('tokenizer', 'dit'), default='tokenizer')
    ap.add_argument('--preset', default=None, help="tokenizer: 'tiny'; dit: 'S'")
    ap.add_argument('--batch', type=int, default=None, help='tokenizer: 16 (CLIP rows); dit: 64')
    ap.add_argument('--channels', type=int, default=16, help='dit: latent channels')
    ap.add_argument('--grid', type=int, default=4, help='dit: latent grid (H = W)')
    ap.add_argument('--rounds', type=int, default=10)
    ap.add_argument('--steps', type=int, default=2, help='steps per variant per round')
    a = ap.parse_args()
    setup_threads()
    dit = a.model == 'dit'
    a.preset = a.preset or ('S' if dit else 'tiny')
    a.batch = a.batch or (64 if dit else 16)
    if dit:
        return dit_main(a)
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
    times = paired_rounds(train, list(runs), a.rounds, a.steps)
    for k in runs:
        print(f'{k}: median {1e3 * statistics.median(times[k]):.1f} ms/step')
    for k in ('static', 'blocks', 'step'):
        print(f'speed-up {k}/eager: {speedup(times, "eager", k)} over {a.rounds} rounds')
    for ref in ('static', 'blocks'):
        print(f'speed-up step/{ref}: {speedup(times, ref, "step")}')


if __name__ == '__main__':
    main()
