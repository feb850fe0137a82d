"Stage-2 GAN fine-tuning as a `fit` recipe: what it trains, exact resume, its run directory."
import json
import pytest
import torch
from safetensors.torch import load_file
from vtp_nbdev.pretrain import pretrain
from vtp_nbdev.gan import GANFinetuneConfig, finetune_decoder_gan
from vtp_nbdev.tokenizer import VTPModel

SMALL = dict(vision_depth=1, decoder_depth=1, text_depth=1)
GAN = GANFinetuneConfig(steps=4, batch=4, disc_start=1, log_every=1, ckpt_every=2, lr=1e-3, disc_lr=2e-3)


@pytest.fixture(scope='module')
def tokenizer_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp('runs')
    return pretrain(dict(model=SMALL, losses='AE', steps=1, batch_clip=4, batch_rec=4, log_every=1, ckpt_every=1,
                         dataset_kwargs={'size': 16}), runs_dir=runs, device='cpu', progress=False)


def test_trains_the_decoder_only(tokenizer_run):
    gan = finetune_decoder_gan(tokenizer_run, GAN, device='cpu', progress=False)
    assert gan.parent == tokenizer_run.parent.parent/'gan'
    assert json.loads((gan/'config.json').read_text())['tokenizer_run'] == tokenizer_run.name
    a, b = load_file(tokenizer_run/'final'/'model.safetensors'), load_file(gan/'final'/'model.safetensors')
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith('pixel_decoder.') for k in changed), sorted(changed)[:5]
    assert 'pixel_decoder.proj_out.weight' in changed
    VTPModel.from_pretrained(gan/'final')                                        # a loadable tokenizer folder
    rows = [json.loads(l) for l in (gan/'metrics.jsonl').read_text().splitlines()]
    assert ['d' in r for r in rows] == [False, True, True, True]


def test_discriminator_keeps_its_own_learning_rate(tokenizer_run, tmp_path):
    from vtp_nbdev.gan import GANFinetuneRecipe
    recipe = GANFinetuneRecipe(GAN, tokenizer_run)
    trainer = recipe.trainer()
    opt = recipe.optimizer(trainer)
    for g in opt.param_groups:
        g['lr'] = 0.5                                                            # what `fit` sets on every group
    trainer.disc(torch.randn(2, 3, 32, 32)).mean().backward()
    opt.step()
    assert [g['lr'] for g in opt.param_groups] == [0.5, GAN.disc_lr]


def test_resume_is_bit_identical(tokenizer_run, tmp_path):
    full = finetune_decoder_gan(tokenizer_run, GAN, device='cpu', progress=False, runs_dir=tmp_path/'a')
    part = finetune_decoder_gan(tokenizer_run, GAN, device='cpu', progress=False, runs_dir=tmp_path/'b', max_steps=3)
    assert not (part/'done.json').exists() and (part/'checkpoints'/'last-00000003.safetensors').exists()
    part = finetune_decoder_gan(tokenizer_run, GAN, device='cpu', progress=False, runs_dir=tmp_path/'b')
    a, b = load_file(full/'final'/'model.safetensors'), load_file(part/'final'/'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda run: [{k: v for k, v in json.loads(l).items() if k not in ('time_s', 'samples_per_s')}
                         for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert strip(full) == strip(part)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='expected a finished tokenizer run'):
        finetune_decoder_gan(tmp_path/'nothing', GAN, device='cpu')
    with pytest.raises(ValueError, match='GANFinetuneConfig.steps=0'):
        GANFinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="unknown GANFinetuneConfig keys"):
        finetune_decoder_gan(tmp_path, {'stpes': 2})
