"""PyTorch's bf16 matmul on the same GPU, for the `dense` / `qmm` rows of `mlx-native bench
qmatmul`: x [512, K] @ W^T with W [N, K] at Llama-3.1-8B's shapes (q/o, gate/up, down,
lm_head), TFLOP/s counted the same way (2 * M * N * K / time)."""
import torch

M = 512
for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)):
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    # Two weight copies, alternated, so consecutive calls do not reread one from L2.
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    fs = [lambda w=w: torch.matmul(x, w.t()) for w in ws]
    for f in fs * 3:
        f()
    torch.cuda.synchronize()
    ts = []
    for i in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fs[i % 2](); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    tm = sorted(ts)[len(ts) // 2]
    flops = 2 * M * n * k
    print(f"torch matmul bf16 M={M} N={n} K={k}: {tm * 1e6:.1f} us, {flops / tm / 1e12:.2f} TFLOP/s ({torch.cuda.get_device_name()})")
    del x, ws, fs
