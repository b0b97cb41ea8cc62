"""The talker's prompt, built from the thinker's prompt as the reference builds it.

    user turns (every token from a user turn's <|im_start|> up to the next <|im_start|>), in order:
        text tokens  -> text_projection(thinker input embedding)
        media tokens -> hidden_projection(thinker hidden state after `accept_hidden_layer` layers)
    system turns and earlier assistant turns: left out
    assistant prefix, 9 positions, text part + codec part summed:
        text:  <|im_start|> assistant \\n  tts_pad tts_pad tts_pad tts_pad  tts_bos  first reply token
        codec: 0           0         0   nothink think_bos think_eos speaker codec_pad codec_bos
Afterwards talker step k adds the text embedding of reply token k + 1 (tts_eos in place of the reply's final
token, tts_pad once the text is spent). Positions: TM-RoPE over the kept ids (user tokens, then 9 tts_pad ids)
with the media the user turns hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import OmniConfig
from ..models.talker import Talker
from ..processing.positions import MediaLayout, rope_positions

ASSISTANT_PREFIX_TEXT = 3  # <|im_start|> assistant \n
ASSISTANT_PREFIX_PADS = 4  # tts_pad positions under nothink / think_bos / think_eos / speaker


@dataclass
class TalkerPrefill:
    embeds: torch.Tensor  # (1, seq, talker hidden)
    positions: torch.Tensor  # (3, 1, seq) float
    rope_delta: float
    text_embeds: torch.Tensor  # (3, talker hidden): tts_bos, tts_eos, tts_pad after text_projection


def user_turn_mask(ids: torch.Tensor, cfg: OmniConfig) -> torch.Tensor:
    """(seq,) bool: the token belongs to a user turn (the role after the latest <|im_start|> is `user`)."""
    index = torch.arange(ids.numel(), device=ids.device)
    starts = torch.where(ids == cfg.im_start_token_id, index, torch.full_like(index, -1))
    latest = torch.cummax(starts, dim=0).values
    role = ids[(latest + 1).clamp(0, ids.numel() - 1)]
    return (latest >= 0) & (role == cfg.user_token_id)


def media_in_user_turns(ids: list[int], keep: list[bool], layout: MediaLayout, cfg: OmniConfig,
                        use_audio_in_video: bool) -> MediaLayout:
    """The layout restricted to the media items whose placeholders lie in kept (user) tokens, in order."""
    t = cfg.thinker
    audio, image, video = iter(layout.audio_token_counts), iter(layout.image_grids), iter(layout.videos)
    kept_audio, kept_image, kept_video = [], [], []
    for i, token in enumerate(ids[:-1]):
        following = ids[i + 1]
        if token == t.vision_start_token_id and following == t.audio_start_token_id and use_audio_in_video:
            pair = (next(video), next(audio))
            if keep[i]:
                kept_video.append(pair[0]), kept_audio.append(pair[1])
        elif token == t.audio_start_token_id and following == t.audio_token_id:
            item = next(audio)
            if keep[i]:
                kept_audio.append(item)
        elif token == t.vision_start_token_id and following in (t.image_token_id, t.video_token_id):
            item = next(image) if following == t.image_token_id else next(video)
            if keep[i]:
                (kept_image if following == t.image_token_id else kept_video).append(item)
    return MediaLayout(tuple(kept_audio), tuple(kept_image), tuple(kept_video))


@torch.inference_mode()
def build_talker_prefill(talker: Talker, cfg: OmniConfig, prompt_ids: torch.Tensor, prompt_embeds: torch.Tensor,
                         accepted_hidden: torch.Tensor, layout: MediaLayout, use_audio_in_video: bool,
                         first_token_embed: torch.Tensor, speaker_id: int, embed_tokens) -> TalkerPrefill:
    """prompt_ids (seq,), prompt_embeds / accepted_hidden (seq, thinker hidden): one prompt's thinker inputs and
    its hidden states after `accept_hidden_layer` layers; first_token_embed (thinker hidden,): the reply's first
    token's embedding; embed_tokens: the thinker's token embedding (for the tts marker tokens)."""
    t, k = cfg.thinker, cfg.talker
    device = prompt_embeds.device
    user = user_turn_mask(prompt_ids, cfg)
    media = (prompt_ids == t.audio_token_id) | (prompt_ids == t.image_token_id) | (prompt_ids == t.video_token_id)
    user_embeds = torch.where(media[user].unsqueeze(-1), talker.hidden_projection(accepted_hidden[user]),
                              talker.text_projection(prompt_embeds[user]))
    markers = torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id], device=device)
    tts_bos, tts_eos, tts_pad = talker.text_projection(embed_tokens(markers))
    starts = ((prompt_ids[:-1] == cfg.im_start_token_id) & (prompt_ids[1:] == cfg.assistant_token_id)).nonzero()
    if starts.numel() == 0 or int(starts[-1]) != prompt_ids.numel() - ASSISTANT_PREFIX_TEXT:
        raise ValueError("speech needs the prompt to end with the generation prompt <|im_start|>assistant\\n")
    head = talker.text_projection(prompt_embeds[-ASSISTANT_PREFIX_TEXT:])
    first = talker.text_projection(first_token_embed.unsqueeze(0))
    text_part = torch.cat([head, tts_pad.expand(ASSISTANT_PREFIX_PADS, -1), tts_bos.unsqueeze(0), first])
    codec_ids = torch.tensor([k.codec_nothink_id, k.codec_think_bos_id, k.codec_think_eos_id, speaker_id,
                              k.codec_pad_id, k.codec_bos_id], device=device)
    codec_part = torch.cat([text_part.new_zeros(ASSISTANT_PREFIX_TEXT, text_part.shape[-1]),
                            talker.embed_codec(codec_ids)])
    embeds = torch.cat([user_embeds, text_part + codec_part]).unsqueeze(0)

    ids = prompt_ids.tolist()
    keep = user.tolist()
    talker_ids = [i for i, kept in zip(ids, keep) if kept] + [cfg.tts_pad_token_id] * text_part.shape[0]
    user_media = media_in_user_turns(ids, keep, layout, cfg, use_audio_in_video)
    positions, delta = rope_positions(talker_ids, user_media, t, use_audio_in_video)
    return TalkerPrefill(embeds, positions.unsqueeze(1).to(device), delta, torch.stack([tts_bos, tts_eos, tts_pad]))
