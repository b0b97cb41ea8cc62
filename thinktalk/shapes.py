"""Token counts that the prompt builder (processing) and the encoders (models) must agree on, computed once here
so that neither imports the other."""

# The downsampling stem of AuT: three 3x3 convolutions of stride 2 and padding 1 (8x fewer steps in time and mel).
CONV_KERNEL, CONV_STRIDE, CONV_PADDING, NUM_CONVS = 3, 2, 1, 3


def downsampled_length(length: int) -> int:
    """Steps left after the three stride-2 convolutions; 0 stays 0 (the reference's `(n - 1) // 2 + 1` form)."""
    for _ in range(NUM_CONVS):
        length = (length + 2 * CONV_PADDING - CONV_KERNEL) // CONV_STRIDE + 1
    return length


def audio_token_count(frames: int, n_window: int) -> int:
    """Tokens the encoder yields for `frames` mel frames: 13 per full chunk of 2*n_window=100 frames plus the
    downsampled tail. (The reference writes 13 as a literal; it is the downsampled length of a full chunk.)"""
    full_chunks, tail = divmod(frames, 2 * n_window)
    return full_chunks * downsampled_length(2 * n_window) + downsampled_length(tail)
