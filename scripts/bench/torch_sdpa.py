"""PyTorch's scaled_dot_product_attention on the same GPU, for `mlx-native bench attention`:
causal prefill with Llama-3.1-8B heads (32 q, 8 kv, dim 128) in bf16, TFLOP/s counted the
same way (2 matmuls, 2 flops per multiply-add, causal half)."""
import torch
import torch.nn.functional as F

for t in (512, 4096):
    q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
    f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    tm = sorted(ts)[len(ts) // 2]
    flops = 2 * 2 * t * t / 2 * 128 * 32
    print(f"torch sdpa causal prefill T={t}: {tm * 1e6:.1f} us, {flops / tm / 1e12:.2f} TFLOP/s ({torch.cuda.get_device_name()})")
