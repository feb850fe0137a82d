"Static shapes: the fixed-length masked-token buffer gives the dynamic path's losses; `compile='step'` is one graph."
import copy
import pytest
import torch
from vtp_nbdev.config import seed_everything
from vtp_nbdev.data import ShapesDataset
from vtp_nbdev.pretrain import PretrainConfig, VTPPretrainer
from vtp_nbdev.masks import mask_capacity

SMALL = dict(vision_depth=2, decoder_depth=1, text_depth=1, dino_out_dim=256, dino_hidden_dim=64,
             dino_bottleneck_dim=32)


def _batch(n=8, start=0):
    ds = ShapesDataset(size=64, context_length=32)
    return torch.utils.data.default_collate([ds[i] for i in range(start, start + n)])


def _pair(**kw):
    cfg = PretrainConfig(model=SMALL, batch_clip=8, batch_ssl=4, batch_rec=2, n_local_crops=2, **kw)
    seed_everything(0)
    dyn = VTPPretrainer(cfg)
    stat = copy.deepcopy(dyn)
    stat.static = True
    return dyn, stat


@pytest.mark.parametrize('mode', ['centering', 'sinkhorn_knopp'])
def test_static_buffer_matches_dynamic(mode):
    "Same batches, both paths, three steps: every term, the gradients and the iBOT centre agree."
    dyn, stat = _pair(dino_mode=mode, mask_prob=0.5)
    for step in range(3):
        batch = _batch(start=8 * step)
        outs = []
        for tr in (dyn, stat):
            tr.zero_grad(set_to_none=True)
            loss, terms = tr(batch, step)
            loss.backward()
            outs.append((loss, terms))
        (la, ta), (lb, tb) = outs
        assert abs(la.item() - lb.item()) <= 1e-6, (step, la.item(), lb.item())
        for k in ta:
            assert abs(ta[k].item() - tb[k].item()) <= 1e-6, (step, k, ta[k].item(), tb[k].item())
        for (n, pa), pb in zip(dyn.named_parameters(), stat.parameters()):
            if pa.grad is not None:
                torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(stat.ibot_loss.center, dyn.ibot_loss.center, rtol=0, atol=1e-7)


def test_static_shapes_depend_on_the_config_only():
    "The buffer length is `mask_capacity` of the config's SSL crops, whatever the step's masks."
    _, stat = _pair(mask_prob=1.0)
    images = _batch()['image'][:4]
    lens = {tuple(stat.ssl_inputs(images, s)['idx'].shape) for s in range(5)}
    n = (stat.net.model.config.image_size // stat.net.model.config.vision_patch_size) ** 2
    assert lens == {(mask_capacity(8, n, (0.1, 0.5)),)}


def test_config_compile_values():
    assert 'compile' not in PretrainConfig().to_dict()                             # hash-neutral at its default
    assert PretrainConfig(compile='step').to_dict()['compile'] == 'step'
    with pytest.raises(ValueError, match='compile'):
        PretrainConfig(compile='all')
    with pytest.raises(ValueError, match='grad_accum'):
        PretrainConfig(compile='step', grad_accum=2, batch_clip=8, batch_ssl=4, batch_rec=2)


def _train(tr, steps=3, after_first=lambda: None):
    "AdamW steps with the EMA update on fixed batches: the losses (`after_first` runs after step 0)."
    from vtp_nbdev.pretrain import make_optimizer, step_schedules
    opt, out = make_optimizer(tr, tr.cfg), []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = tr(_batch(start=8 * step), step)
        loss.backward()
        opt.step()
        tr.net.update_teacher(step_schedules(tr.cfg, step)['momentum'])
        out.append(loss.item())
        if step == 0:
            after_first()
    return out


def test_compiled_step_is_one_graph_without_recompiles():
    "compile='step': one graph (no break) on the first step, no recompile on the next two; eager's losses."
    from torch._dynamo.utils import counters
    cfg = PretrainConfig(preset='tiny', batch_clip=8, batch_ssl=4, batch_rec=2, n_local_crops=2, steps=3,
                         compile='step')
    seed_everything(0)
    eager = VTPPretrainer(cfg)
    comp = copy.deepcopy(eager).compile_step(backend='aot_eager')             # dynamo's graph capture, eager kernels
    ref = _train(eager)
    torch._dynamo.reset()
    counters.clear()
    seen = {}

    def first():
        seen.update(graphs=counters['stats']['unique_graphs'], breaks=dict(counters['graph_break']))
        torch._dynamo.config.error_on_recompile = True                          # steps 2 and 3: the guards hold

    try:
        losses = _train(comp, 3, first)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert seen == dict(graphs=1, breaks={}), seen
    assert counters['stats']['unique_graphs'] == 1 and not counters['graph_break'] and not counters['recompiles']
    assert max(abs(a - b) for a, b in zip(ref, losses)) <= 1e-4, (ref, losses)


def test_pretrain_with_compiled_step(tmp_path, monkeypatch):
    "`pretrain(compile='step')` compiles the step in `fit` (dynamo capture, eager kernels) and logs eager's losses."
    import json
    from vtp_nbdev.pretrain import pretrain
    compile_step = VTPPretrainer.compile_step
    monkeypatch.setattr(VTPPretrainer, 'compile_step', lambda self: compile_step(self, backend='aot_eager'))
    base = dict(model=SMALL, steps=3, batch_clip=8, batch_ssl=4, batch_rec=2, n_local_crops=2, log_every=1,
                ckpt_every=3, dataset_kwargs={'size': 24})
    rows = lambda run: [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    a = rows(pretrain(PretrainConfig(**base), runs_dir=tmp_path, device='cpu', progress=False))
    b = rows(pretrain(PretrainConfig(**base, compile='step'), runs_dir=tmp_path, device='cpu', progress=False))
    assert len(a) == len(b) == 3
    assert all(abs(x[k] - y[k]) <= 1e-4 for x, y in zip(a, b) for k in ('loss', 'clip', 'dino', 'ibot', 'rec'))
