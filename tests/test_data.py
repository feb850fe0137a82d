"Datasets: determinism, splits, tokens, augmentations, and every kind of bad input named by its file and key."
import io, tarfile, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from vtp_nbdev.data import (ShapesDataset, FashionMNISTDataset, ImageFolderDataset, ImageTextDataset, TarShardDataset,
                            BadSampleError, get_dataset, load_image, multicrop, block_masks, tokenize, shapes_sample,
                            read_idx, SHAPES_CLASSES, to_uint8)
from vtp_nbdev.data import block_masks_loop, stream_key


def _png(path, arr):
    Image.fromarray(arr).save(path); return path


def _tar(path, members):
    with tarfile.open(path, 'w') as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
    return path


def test_shapes_deterministic_by_seed_and_index():
    a, b = ShapesDataset(size=50, seed=3), ShapesDataset(size=50, seed=3)
    for i in (0, 7, 49):
        assert torch.equal(a[i]['image'], b[i]['image']) and a[i]['caption'] == b[i]['caption']
    assert not torch.equal(a[0]['image'], ShapesDataset(size=50, seed=4)[0]['image'])
    assert not torch.equal(a[0]['image'], a[1]['image'])


def test_shapes_splits_disjoint():
    tr, va, te = (ShapesDataset(s, size=200) for s in ('train', 'val', 'test'))
    key = lambda d: {d[i]['image'].numpy().tobytes() for i in range(len(d))}
    ktr, kva, kte = key(tr), key(va), key(te)
    assert len(ktr) == 200 and not (ktr & kva) and not (ktr & kte) and not (kva & kte)
    assert tr.offset != va.offset != te.offset


def test_shapes_labels_and_semantics_cover_classes():
    labels = [shapes_sample(i)[2] for i in range(2000)]
    assert set(labels) == set(range(len(SHAPES_CLASSES)))
    _, cap, lbl, attrs = shapes_sample(11)
    assert SHAPES_CLASSES[lbl] == f"{attrs['colour']} {attrs['shape']}"


def test_sample_format_and_resolution():
    s = ShapesDataset(size=4, res=64, context_length=24)[0]
    assert s['image'].shape == (3, 64, 64) and s['image'].dtype == torch.float32
    assert s['tokens'].shape == (24,) and s['tokens'].dtype == torch.int64 and isinstance(s['label'], int)
    assert -2.2 < s['image'].min() and s['image'].max() < 2.7        # ImageNet-normalised range


def test_tokenisation_matches_open_clip():
    import open_clip
    caps = ['two small red triangles at the top left', 'a cat']
    ref = open_clip.get_tokenizer('ViT-B-32')(caps, context_length=20)
    assert torch.equal(tokenize(caps, 20), ref)
    assert torch.equal(tokenize(caps[0], 20)[0], ref[0])
    with pytest.raises(TypeError, match='expected str'): tokenize([3])


def test_dataloader_collates_and_workers_report_clear_errors(tmp_path):
    dl = torch.utils.data.DataLoader(ShapesDataset(size=16, context_length=16), batch_size=8, num_workers=1)
    b = next(iter(dl))
    assert b['image'].shape == (8, 3, 32, 32) and b['tokens'].shape == (8, 16) and len(b['caption']) == 8
    (tmp_path/'bad.csv').write_text('path,caption\nmissing.png,a ghost\n')
    dl = torch.utils.data.DataLoader(ImageTextDataset(tmp_path/'bad.csv', res=16), batch_size=1, num_workers=1)
    with pytest.raises(BadSampleError, match='bad.csv:2: listed file .*missing.png does not exist'):
        next(iter(dl))


def test_multicrop_shapes_and_determinism():
    x = torch.randn(5, 3, 32, 32)
    crops = multicrop(x, n_global=2, n_local=3, patch_size=4, generator=torch.Generator().manual_seed(1))
    assert [tuple(c.shape) for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 12, 12)] * 3
    again = multicrop(x, n_global=2, n_local=3, patch_size=4, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    crops64 = multicrop(torch.randn(2, 3, 64, 64), n_local=1, patch_size=8)
    assert crops64[-1].shape[-1] % 8 == 0
    with pytest.raises(ValueError, match='not divisible by the patch size'):
        multicrop(torch.randn(2, 3, 30, 30), patch_size=4)


def test_block_masks():
    m = block_masks(400, (8, 8), ratio_range=(0.1, 0.5), mask_prob=0.5, generator=torch.Generator().manual_seed(0))
    assert m.shape == (400, 64) and m.dtype == torch.bool
    masked = m.any(1)
    assert 0.4 < masked.float().mean() < 0.6
    frac = m[masked].float().mean(1)
    assert frac.min() >= 0.1 - 1e-6 and 0.2 < frac.mean() < 0.45
    assert block_masks(3, (4, 4), mask_prob=1.0, ratio_range=(0.5, 0.5)).sum(1).ge(8).all()


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_corrupt_and_truncated_images(tmp_path):
    good = _png(tmp_path/'good.png', np.zeros((20, 20, 3), np.uint8))
    (tmp_path/'corrupt.jpg').write_bytes(b'garbage' * 10)
    (tmp_path/'truncated.png').write_bytes(good.read_bytes()[:40])
    (tmp_path/'empty.png').write_bytes(b'')
    for name in ('corrupt.jpg', 'truncated.png', 'empty.png'):
        with pytest.raises(BadSampleError, match=f'{name}: cannot read image'):
            load_image(tmp_path/name, 16)


@pytest.mark.parametrize('mode,value,expect', [('RGBA', (255, 0, 0, 255), (255, 0, 0)), ('L', 77, (77, 77, 77)),
                                               ('CMYK', (0, 0, 0, 0), (255, 255, 255)), ('LA', (0, 0), (255, 255, 255)),
                                               ('P', 0, (0, 0, 0)), ('1', 1, (255, 255, 255))])
def test_colour_modes_become_rgb(tmp_path, mode, value, expect):
    p = tmp_path/f'img.{"jpg" if mode == "CMYK" else "png"}'
    Image.new(mode, (12, 10), value).save(p)
    out = load_image(p, 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert np.abs(out[4, 4].astype(int) - np.array(expect)).max() <= 2


def test_sixteen_bit_image(tmp_path):
    p = tmp_path/'deep.png'
    Image.fromarray(np.full((10, 10), 32896, np.uint16)).save(p)
    assert load_image(p, 8)[0, 0].tolist() == [128, 128, 128]


def test_image_text_csv_bad_rows_and_skip(tmp_path):
    _png(tmp_path/'a.png', np.full((8, 8, 3), 200, np.uint8))
    (tmp_path/'t.tsv').write_text('image\ttext\na.png\ta bright square\na.png\t   \nnope.png\tgone\n')
    ds = ImageTextDataset(tmp_path/'t.tsv', res=8)
    assert ds[0]['caption'] == 'a bright square' and ds[0]['label'] == -1
    with pytest.raises(BadSampleError, match='t.tsv:3: empty caption'): ds[1]
    with pytest.raises(BadSampleError, match='t.tsv:4: listed file .*nope.png does not exist'): ds[2]
    skip = ImageTextDataset(tmp_path/'t.tsv', res=8, skip_bad=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        assert skip[1]['caption'] == 'a bright square' and skip[2]['caption'] == 'a bright square'
    assert skip.n_skipped == 3 and any('nope.png' in str(x.message) for x in w)
    (tmp_path/'h.csv').write_text('file_name,label\na.png,1\n')
    with pytest.raises(ValueError, match='needs a path column'): ImageTextDataset(tmp_path/'h.csv')
    (tmp_path/'e.csv').write_text('')
    with pytest.raises(ValueError, match='has no rows'): ImageTextDataset(tmp_path/'e.csv')
    (tmp_path/'latin.csv').write_bytes('path,caption\na.png,caf\xe9\n'.encode('latin-1'))
    with pytest.raises(ValueError, match='not UTF-8'): ImageTextDataset(tmp_path/'latin.csv')
    with pytest.raises(FileNotFoundError, match='does not exist'): ImageTextDataset(tmp_path/'none.csv')


def test_tar_shards(tmp_path):
    png = _png(tmp_path/'a.png', np.full((8, 8, 3), 9, np.uint8)).read_bytes()
    sh = _tar(tmp_path/'s-000.tar', [('k0.png', png), ('k0.txt', b'nine'), ('k1.png', png), ('k2.txt', b'orphan'),
                                     ('k3.png', b'broken'), ('k3.txt', b'x'), ('k4.png', png), ('k4.txt', b'\xff\xfe')])
    ds = TarShardDataset(sh, res=8)
    assert len(ds) == 5 and ds[0]['caption'] == 'nine'
    with pytest.raises(BadSampleError, match="'k1' has no caption"): ds[1]
    with pytest.raises(BadSampleError, match="'k2' has no image"): ds[2]
    with pytest.raises(BadSampleError, match="s-000.tar:k3: cannot read image"): ds[3]
    with pytest.raises(BadSampleError, match="caption of 'k4' is not UTF-8"): ds[4]
    (tmp_path/'junk.tar').write_bytes(b'not a tar' * 100)
    with pytest.raises(ValueError, match='unreadable tar shard'): TarShardDataset(tmp_path/'junk.tar')
    _tar(tmp_path/'empty.tar', [])
    with pytest.raises(ValueError, match='contain no samples'): TarShardDataset(tmp_path/'empty.tar')


def test_image_folder_errors(tmp_path):
    (tmp_path/'flat').mkdir()
    with pytest.raises(ValueError, match='no class sub-folders'): ImageFolderDataset(tmp_path/'flat')
    (tmp_path/'flat'/'cls').mkdir()
    with pytest.raises(ValueError, match='contains no images'): ImageFolderDataset(tmp_path/'flat')
    with pytest.raises(FileNotFoundError, match='is not a folder'): ImageFolderDataset(tmp_path/'nowhere')


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"): get_dataset('imagenet')
    with pytest.raises(ValueError, match='resolution 30 is not divisible by the patch size 4'): get_dataset('shapes', res=30, patch_size=4)
    with pytest.raises(ValueError, match='unknown split'): get_dataset('shapes', 'dev')
    with pytest.raises(ValueError, match='size=0'): get_dataset('shapes', size=0)


def test_fashion_mnist_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        FashionMNISTDataset(data_root=tmp_path)


def test_fashion_mnist_reader_on_made_files(tmp_path):
    import gzip, struct
    d = tmp_path/'fashion-mnist'; d.mkdir()
    imgs = np.random.default_rng(0).integers(0, 255, (12, 28, 28), dtype=np.uint8); lbls = np.arange(12, dtype=np.uint8) % 10
    for split, n in (('train', 12), ('t10k', 12)):
        with gzip.open(d/f'{split}-images-idx3-ubyte.gz', 'wb') as f: f.write(struct.pack('>4B3I', 0, 0, 8, 3, n, 28, 28) + imgs.tobytes())
        with gzip.open(d/f'{split}-labels-idx1-ubyte.gz', 'wb') as f: f.write(struct.pack('>4BI', 0, 0, 8, 1, n) + lbls.tobytes())
    tr, va = FashionMNISTDataset('train', data_root=tmp_path, n_val=2), FashionMNISTDataset('val', data_root=tmp_path, n_val=2)
    assert (len(tr), len(va)) == (10, 2) and tr[3]['label'] == 3 and tr[0]['image'].shape == (3, 32, 32)
    sub = get_dataset('fashion_mnist', 'train', data_root=tmp_path, n_val=2, seed=1, size=4, context_length=16)
    assert len(sub) == 4 and sub[3]['label'] == 3 and sub[0]['tokens'].shape == (16,)
    px = to_uint8(tr[0]['image']); assert torch.equal(px[0], px[1]) and torch.equal(px[1], px[2])   # grey replicated
    assert np.array_equal(read_idx(d/'train-images-idx3-ubyte.gz')[5], imgs[5])
    with gzip.open(d/'t10k-images-idx3-ubyte.gz', 'wb') as f: f.write(struct.pack('>4B3I', 0, 0, 8, 3, 12, 28, 28) + imgs.tobytes()[:100])
    with pytest.raises(ValueError, match='truncated IDX file'): FashionMNISTDataset('test', data_root=tmp_path)


@pytest.mark.skipif(not Path('/usr/share/datasets/fashion-mnist').is_dir(), reason='dataset-fashion-mnist not installed')
def test_fashion_mnist_real_files():
    ds = FashionMNISTDataset('test', data_root='/usr/share/datasets')
    assert len(ds) == 10_000 and ds[0]['image'].shape == (3, 32, 32) and 0 <= ds[0]['label'] < 10
    assert len(FashionMNISTDataset('train', data_root='/usr/share/datasets')) == 55_000


def _folder(root, n=30):
    for i in range(n):
        d = root/('a' if i % 3 else 'b')
        d.mkdir(parents=True, exist_ok=True)
        _png(d/f'{i:02d}.png', np.full((10, 10, 3), i * 4 % 256, np.uint8))
    return root


def test_every_dataset_takes_the_training_keys(tmp_path):
    "What pre-training, scaling and latents pass (seed, size, context_length, skip_bad) works for every dataset."
    root = _folder(tmp_path/'folder')
    png = (root/'a'/'01.png').read_bytes()
    (tmp_path/'shards').mkdir()
    members = [(f'{i:02d}.{e}', png if e == 'png' else f'caption {i}'.encode())
               for i in range(12) for e in ('png', 'txt')]
    _tar(tmp_path/'shards'/'s0.tar', members)
    rows = ''.join(f'folder/a/{i:02d}.png,pic {i}\n' for i in range(1, 30, 3))
    (tmp_path/'t.csv').write_text('path,caption\n' + rows)
    generic = dict(seed=5, size=3, context_length=16, skip_bad=True)
    sources = [('shapes', {}), ('image_folder', dict(root=root)), ('image_text', dict(source=str(tmp_path/'t.csv'))),
               ('image_text', dict(source=tmp_path/'shards')),
               ('image_text', dict(source=str(tmp_path/'shards'/'*.tar')))]
    for name, kw in sources:
        kw = {**kw, **generic}
        if name == 'shapes':
            kw.pop('skip_bad')
        ds = get_dataset(name, 'all' if name != 'shapes' else 'train', res=16, patch_size=4, **kw)
        assert len(ds) == 3 and ds[2]['tokens'].shape == (16,) and ds[0]['image'].shape == (3, 16, 16), name
    with pytest.raises(ValueError, match=r"dataset 'shapes' does not take \['skip_bad'\]"):
        get_dataset('shapes', skip_bad=True)
    with pytest.raises(ValueError, match='size=0'):
        get_dataset('image_folder', 'all', root=root, size=0)


def test_held_out_splits_by_key_hash(tmp_path):
    "Sources without splits are split by a hash of each key: disjoint, complete, the same for a folder and a CSV."
    root = _folder(tmp_path/'folder', 60)
    parts = {s: get_dataset('image_folder', s, root=root, res=8, val_frac=0.2, test_frac=0.3)
             for s in ('train', 'val', 'test')}
    files = {s: {f for f, _ in d.files} for s, d in parts.items()}
    assert sum(map(len, files.values())) == 60
    assert not files['train'] & files['test'] and not files['val'] & files['test']
    assert parts['train'].classes == parts['test'].classes == ('a', 'b')
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        get_dataset('image_folder', 'dev', root=tmp_path/'folder')
    with pytest.raises(ValueError, match=r'val_frac \+ test_frac = 1\.0; expected < 1'):
        get_dataset('image_folder', 'train', root=tmp_path/'folder', val_frac=0.5, test_frac=0.5)
    for s in ('val', 'test'):
        (root/s/'a').mkdir(parents=True)
        _png(root/s/'a'/'x.png', np.zeros((8, 8, 3), np.uint8))
    assert len(get_dataset('image_folder', 'test', root=root, res=8)) == 1     # root/test exists: it is the split
    (root/'val').rename(root/'other_val')
    with pytest.raises(ValueError, match=r"has split folders \['test'\] but no 'val' folder"):
        get_dataset('image_folder', 'val', root=root, res=8)
    with pytest.raises(FileNotFoundError, match='holds no .tar shards'):
        get_dataset('image_text', source=tmp_path/'folder')


def _loop_and_vectorised(n, grid, **kw):
    return (block_masks_loop(n, grid, generator=torch.Generator().manual_seed(1), **kw),
            block_masks(n, grid, key=stream_key(1, 0), **kw))


def test_block_masks_statistics_match_the_reference_loop():
    ref, vec = _loop_and_vectorised(3000, (16, 16), ratio_range=(0.1, 0.5), mask_prob=0.5)
    fr, fv = ref.float().mean(1), vec.float().mean(1)
    for f in (fr, fv):
        assert abs((f > 0).float().mean() - 0.5) < 0.03                      # share of masked images ~ mask_prob
        assert f[f > 0].min() >= round(256 * 0.1) / 256 and f.max() < 0.6    # within the ratio range, small overshoot
    q = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(fr[fr > 0].quantile(q), fv[fv > 0].quantile(q), atol=0.02)
    assert abs(fr[fr > 0].mean() - fv[fv > 0].mean()) < 0.01


def test_block_masks_blocks_are_rectangles():
    for m in _loop_and_vectorised(500, (16, 16), ratio_range=(1 / 256, 1 / 256), mask_prob=1.0):   # one block each
        m = m.view(-1, 16, 16)
        rows, cols = m.any(2), m.any(1)                                       # (n, 16): the bounding box
        assert torch.equal(m.sum((1, 2)), rows.sum(1) * cols.sum(1))          # the box is filled: a rectangle
        assert rows.sum(1).le(2).all() and cols.sum(1).le(2).all()            # aspect 0.3-3.3 of area 1
    m = block_masks(2000, (16, 16), ratio_range=(0.3, 0.3), mask_prob=1.0, key=3).view(-1, 16, 16)
    tall = (m.any(2).sum(1) > m.any(1).sum(1)).float().mean()
    assert 0.3 < tall < 0.7                                                   # aspect ratios symmetric about 1


def test_block_masks_do_not_depend_on_the_world_size():
    B, b, key = 24, 6, stream_key(0, 5)
    ids = lambda rank, world: (torch.arange(2)[:, None] * B + rank + world * torch.arange(B // world)).flatten()
    whole = block_masks(ids(0, 1), (8, 8), key=key).view(2, B, -1)
    for world in (2, 4):
        for rank in range(world):
            assert torch.equal(block_masks(ids(rank, world), (8, 8), key=key), whole[:, rank::world].reshape(-1, 64))
    assert not torch.equal(block_masks(ids(0, 1), (8, 8), key=stream_key(0, 6)), whole.view(2 * B, -1))
    assert not torch.equal(block_masks(ids(0, 1), (8, 8), key=stream_key(1, 5)), whole.view(2 * B, -1))
