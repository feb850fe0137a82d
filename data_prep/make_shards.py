"""Pack image-caption pairs listed in a CSV/TSV into webdataset-style tar shards (`KEY.<ext>` + `KEY.txt`).

The table needs a header with a path column (`path`, `filepath`, `image` or `file`; relative paths are relative to the
table's folder) and a caption column (`caption`, `text` or `title`), as `vtp_nbdev.data.ImageTextDataset` reads it.
Image bytes are copied unchanged; keys are the row numbers (`000000`, ...), so the held-out split of a pair (a hash of
its key) is fixed by its row. Rows whose file is missing or whose caption is empty are reported and left out.

    python data_prep/make_shards.py pairs.csv shards/ --per-shard 1000
    # then: get_dataset('image_text', 'train', source='shards/')
"""
from __future__ import annotations
import argparse, csv, io, sys, tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vtp_nbdev.data import ImageTextDataset, IMAGE_EXTS


def _add(tf: tarfile.TarFile, name: str, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def make_shards(table, out, per_shard: int = 1000, prefix: str = 'shard') -> list:
    "Write the table's good pairs into `out/<prefix>-NNNNN.tar` shards of `per_shard` pairs; returns the shard paths."
    if per_shard < 1:
        raise ValueError(f"per_shard={per_shard}; expected a positive integer")
    table, out = Path(table), Path(out)
    delimiter = '\t' if table.suffix.lower() == '.tsv' else ','
    with open(table, newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    header = rows[0].keys() if rows else []
    pc = next((c for c in ImageTextDataset.PATH_COLS if c in header), None)
    cc = next((c for c in ImageTextDataset.CAPTION_COLS if c in header), None)
    if pc is None or cc is None:
        raise ValueError(f"{table}: header {list(header)} needs a path column {ImageTextDataset.PATH_COLS} and a "
                         f"caption column {ImageTextDataset.CAPTION_COLS}")
    out.mkdir(parents=True, exist_ok=True)
    shards, tf, n = [], None, 0
    for line, r in enumerate(rows, start=2):
        path, caption = table.parent/(r[pc] or ''), (r[cc] or '').strip()
        ext = path.suffix.lower()
        if not caption or not path.is_file() or ext not in IMAGE_EXTS:
            print(f"{table}:{line}: left out ({'empty caption' if not caption else f'no image file {path}'})")
            continue
        if n % per_shard == 0:
            if tf is not None:
                tf.close()
            shards.append(out/f'{prefix}-{len(shards):05d}.tar')
            tf = tarfile.open(shards[-1], 'w')
        _add(tf, f'{line - 2:06d}{ext}', path.read_bytes())
        _add(tf, f'{line - 2:06d}.txt', caption.encode('utf-8'))
        n += 1
    if tf is not None:
        tf.close()
    print(f"{n} pairs of {len(rows)} rows in {len(shards)} shards under {out}")
    return shards


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('table', help='CSV/TSV with a path and a caption column')
    p.add_argument('out', help='folder for the shards')
    p.add_argument('--per-shard', type=int, default=1000)
    p.add_argument('--prefix', default='shard')
    a = p.parse_args(argv)
    make_shards(a.table, a.out, a.per_shard, a.prefix)


if __name__ == '__main__':
    main()
