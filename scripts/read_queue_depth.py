"""How fast a model's expert files read at several queue depths: files one after another, each split
into pieces that T threads read at once, past the page cache (O_DIRECT), as the expert cache's
misses are read (README, "A laptop's memory").

    python scripts/read_queue_depth.py MODEL_FOLDER FILES_PER_SETTING

Each setting reads files the others did not (so the page cache never serves one twice)."""
import os, sys, time, mmap, glob, random
from concurrent.futures import ThreadPoolExecutor
folder, count = sys.argv[1], int(sys.argv[2])
files = sorted(glob.glob(folder + "/experts/*.bin")); random.seed(1); random.shuffle(files)
size = os.path.getsize(files[0])
buf = mmap.mmap(-1, size + (1 << 20))
for threads, piece_kib in [(1, 4096), (2, 4096), (2, 1024), (4, 1024), (4, 512), (8, 512), (8, 256), (16, 256)]:
    piece = piece_kib << 10
    chosen, files = files[:count], files[count:]
    pool = ThreadPoolExecutor(threads)
    def one(args):
        fd, off = args
        return os.preadv(fd, [memoryview(buf)[off:off + min(piece, size - off)]], off)
    t = time.perf_counter(); total = 0
    for path in chosen:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        total += sum(pool.map(one, [(fd, off) for off in range(0, size, piece)]))
        os.close(fd)
    dt = time.perf_counter() - t
    print(f"{threads:2d} threads, {piece_kib:4d} KiB pieces: {total/dt/1e9:.2f} GB/s ({len(chosen)} files of {size/1e6:.1f} MB)")
    pool.shutdown()
