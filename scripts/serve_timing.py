"""Time ``lenet_xp.serve``'s API on this machine: a real server on 127.0.0.1 (a free port,
serving in a thread), ``--repeat`` POSTs of one MNIST test digit as PNG, with and without
feature maps; prints the answer's size and the median and 90th-percentile round trip.

    LENET_XP_DATA=../shared/datasets/mnist python scripts/serve_timing.py RUN/best.npz
"""

import argparse
import io
import statistics
import threading
import time
import urllib.request

from PIL import Image

from lenet_xp import serve
from lenet_xp.data.mnist import load_mnist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args()
    png = io.BytesIO()
    Image.fromarray(load_mnist(None, download=False).test_images[0]).save(png, format="PNG")
    srv = serve.make_server(args.checkpoint, port=0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/predict"
    print(f"{'request':<22} {'answer bytes':>12} {'median ms':>10} {'p90 ms':>8}")
    try:
        for query in ("", "?maps=0"):
            times, size = [], 0
            for _ in range(args.repeat):
                request = urllib.request.Request(
                    url + query, data=png.getvalue(), headers={"Content-Type": "image/png"}
                )
                start = time.perf_counter()
                with urllib.request.urlopen(request) as answer:
                    size = len(answer.read())
                times.append(1000 * (time.perf_counter() - start))
            p90 = statistics.quantiles(times, n=10)[-1]
            print(
                f"POST /predict{query:<9} {size:>12,} {statistics.median(times):>10.1f} {p90:>8.1f}"
            )
    finally:
        srv.shutdown()
        srv.server_close()


if __name__ == "__main__":
    main()
