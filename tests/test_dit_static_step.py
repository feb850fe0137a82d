"DiT `compile='step'`: static shapes fixed by the config, one graph without recompiles, the eager step's losses."
import contextlib, copy, json
import pytest
import torch
from torch._dynamo.utils import counters
from vtp_nbdev.flow import DiTTrainConfig, DiTTrainer, DiTRecipe, train_dit
from conftest import end_process_group

STRIP = ('time_s', 'samples_per_s')
# aot_eager (dynamo's capture and AOT autograd, eager kernels) runs the eager ATen kernels on the same inputs; only
# functionalisation and the decompositions of composite ops may reorder fp32 sums. Losses are ~2-3, where one fp32 ulp
# is 2.4e-7: 1e-5 allows a few tens of ulps drift over 4 AdamW steps (measured here: 0, bit-identical).
LOSS_TOL = 1e-5


def _cfg(**kw):
    return DiTTrainConfig(**{**dict(steps=4, batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=4), **kw})


def _recipe(lat, cfg):
    "The recipe set up on one CPU process and its seeded trainer."
    recipe = DiTRecipe(cfg, lat)
    recipe.setup(torch.device('cpu'), 0, 1)
    torch.manual_seed(0)
    return recipe, recipe.trainer()


def test_step_inputs_have_shapes_fixed_by_the_config(tiny_latents):
    "Every step's batch (latents, labels, draws) has the same shapes, dtypes and strides: (batch, *latent shape)."
    _, lat = tiny_latents
    cfg = _cfg(compile='step')
    recipe, _ = _recipe(lat, cfg)
    sig = lambda b: {k: (tuple(v.shape), v.dtype, v.stride()) for k, v in b.items()}
    sigs = [sig(recipe.batch(s)) for s in range(6)]
    assert all(s == sigs[0] for s in sigs), sigs
    C, H, W = recipe.ds.shape
    assert sigs[0]['x1'][0] == sigs[0]['x0'][0] == (cfg.batch, C, H, W)
    assert {sigs[0][k][0] for k in ('y', 't', 'drop')} == {(cfg.batch,)}


def _train(recipe, trainer, steps, after_first=lambda: None):
    "`steps` AdamW steps with the EMA update through the recipe's loss step; the losses (`after_first` after step 0)."
    opt, out = recipe.optimizer(trainer), []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = recipe.loss(trainer, trainer, recipe.batch(step), step, contextlib.nullcontext())   # and backward
        opt.step()
        recipe.after_step(trainer, step, {})
        out.append(loss.item())
        if step == 0:
            after_first()
    return out


def test_compiled_step_is_one_graph_without_recompiles(tiny_latents):
    "compile_step: one graph (no break) on the first step, no recompile on the next three; the eager losses."
    _, lat = tiny_latents
    recipe, eager = _recipe(lat, _cfg(compile='step'))
    comp = copy.deepcopy(eager).compile_step(backend='aot_eager')
    ref = _train(recipe, eager, 4)
    torch._dynamo.reset()
    counters.clear()
    seen = {}

    def first():
        seen.update(graphs=counters['stats']['unique_graphs'], breaks=dict(counters['graph_break']))
        torch._dynamo.config.error_on_recompile = True                          # steps 2-4: the guards hold

    try:
        losses = _train(recipe, comp, 4, first)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert seen == dict(graphs=1, breaks={}), seen
    assert counters['stats']['unique_graphs'] == 1 and not counters['graph_break'] and not counters['recompiles']
    assert max(abs(a - b) for a, b in zip(ref, losses)) <= LOSS_TOL, (ref, losses)
    for a, b in zip(eager.ema.parameters(), comp.ema.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_train_dit_with_compiled_step(tiny_latents, tmp_path, monkeypatch):
    "`train_dit(compile='step')` compiles in `fit` (aot_eager here), logs eager's losses, runs under its own hash."
    _, lat = tiny_latents
    compile_step = DiTTrainer.compile_step
    monkeypatch.setattr(DiTTrainer, 'compile_step', lambda self: compile_step(self, backend='aot_eager'))
    rows = lambda run: [{k: v for k, v in json.loads(l).items() if k not in STRIP}
                        for l in (run/'metrics.jsonl').read_text().splitlines()]
    eager = train_dit(_cfg(), lat, tmp_path, 'cpu', progress=False)
    torch._dynamo.reset()
    counters.clear()
    comp = train_dit(_cfg(compile='step'), lat, tmp_path, 'cpu', progress=False)
    assert comp != eager and json.loads((comp/'config.json').read_text())['compile'] == 'step'
    assert counters['stats']['unique_graphs'] == 1 and not counters['graph_break'] and not counters['recompiles']
    a, b = rows(eager), rows(comp)
    assert [r['step'] for r in a] == [r['step'] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert all(abs(x[k] - y[k]) <= LOSS_TOL for k in ('loss', 'mse', 'cos')), (x, y)


@pytest.mark.parametrize('value, message', [('all', "compile='all'; expected False, True"), (1, 'compile=1'),
                                            ('True', "compile='True'")])
def test_compile_values(value, message):
    with pytest.raises(ValueError, match=message):
        DiTTrainConfig(compile=value)
    with pytest.raises(ValueError, match="compile='step' needs grad_accum=1"):
        DiTTrainConfig(compile='step', grad_accum=2)
    assert 'compile' not in DiTTrainConfig().to_dict() and DiTTrainConfig(compile=True).to_dict()['compile'] is True


def _ddp_worker(rank, world, port, cfg, lat, runs):
    "One rank of a gloo DDP run with compile='step' (aot_eager); writes its dynamo counters."
    import os
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    compile_step = DiTTrainer.compile_step
    DiTTrainer.compile_step = lambda self: compile_step(self, backend='aot_eager')
    train_dit(cfg, lat, runs, 'cpu', progress=False)
    seen = dict(graphs=counters['stats']['unique_graphs'], breaks=len(counters['graph_break']),
                recompiles=len(counters['recompiles']))
    (runs/f'counters-{rank}.json').write_text(json.dumps(seen))
    end_process_group()


def test_ddp_wraps_the_compiled_step(tiny_latents, tmp_path, spawn_ranks):
    "Two gloo ranks: DDP wraps the trainer (outside the graph); one graph per rank, one process's eager losses."
    _, lat = tiny_latents
    (tmp_path/'ddp').mkdir()
    spawn_ranks(_ddp_worker, _cfg(steps=3, ckpt_every=3, compile='step'), lat, tmp_path/'ddp')
    for rank in range(2):
        seen = json.loads((tmp_path/'ddp'/f'counters-{rank}.json').read_text())
        assert seen == dict(graphs=1, breaks=0, recompiles=0), (rank, seen)
    one = train_dit(_cfg(steps=3, ckpt_every=3), lat, tmp_path/'one', 'cpu', progress=False)
    ddp = next((tmp_path/'ddp'/'dit').iterdir())
    losses = lambda run: [json.loads(l)['loss'] for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert json.loads((ddp/'done.json').read_text())['world_size'] == 2
    assert max(abs(a - b) for a, b in zip(losses(one), losses(ddp))) <= LOSS_TOL, (losses(one), losses(ddp))
