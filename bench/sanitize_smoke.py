"""Small forward+backward calls of every GPU backend, for compute-sanitizer's memcheck."""
import torch

import fastpref


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        # odd shapes so every boundary mask is exercised
        h = torch.randn(37, 72, generator=g).to(dev, dtype).requires_grad_()
        w = (torch.randn(1001, 72, generator=g) / 8).to(dev, dtype).requires_grad_()
        b = torch.randn(1001, generator=g).to(dev, dtype).requires_grad_()
        rh = torch.randn(37, 40, generator=g).to(dev, dtype)
        rw = torch.randn(1001, 40, generator=g).to(dev, dtype)
        y = torch.randint(0, 1001, (37,), generator=g).to(dev)
        y[::5] = -100
        for backend in fastpref.available_backends(dev):
            st = fastpref.token_stats(h, w, y, bias=b, softcap=20.0, entropy=True, log_sum_p2=True, backend=backend)
            (st.logp.sum() + st.lse.sum() + st.entropy.sum()).backward()
            for direction in ("forward", "reverse"):
                kl = fastpref.token_kl(h, w, rh, rw, y, bias=b, direction=direction, backend=backend)
                (kl.kl.sum() + kl.logp.sum()).backward()
            torch.cuda.synchronize()
            print(f"ok {backend} {dtype}")


if __name__ == "__main__":
    main()
