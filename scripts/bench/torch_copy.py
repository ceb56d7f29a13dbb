"""Cross-check of the bandwidth roofline: PyTorch's device-to-device copy on the same GPU.

Run on the GPU machine beside `mlx-native bench`: prints GB/s counting bytes read plus
written (the copy convention) and bytes read only (comparable to our read probe)."""
import torch

n = 1 << 30  # 1 GiB
a = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
times = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    times.append(s.elapsed_time(e) / 1e3)
t = sorted(times)[len(times) // 2]
print(f"torch d2d copy: {2 * n / t / 1e9:.1f} GB/s (read+write), {n / t / 1e9:.1f} GB/s read side, "
      f"{torch.cuda.get_device_name()}")
