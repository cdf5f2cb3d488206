"""A tiny random Karlo (diffusers UnCLIPPipeline with Karlo's block types), saved locally."""
import os

import torch
import diffusers
import transformers
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

from helpers.clip_tokenizer import write_tiny_tokenizer

D, L = 16, 8          # CLIP embedding / text width, caption tokens


def _unet_common():
    return dict(layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8)


def build_tiny_karlo(root):
    """Save the pipeline under root/src; returns (src, pipeline)."""
    src = str(root / "src")
    tok_dir = str(root / "tok")
    os.makedirs(tok_dir)
    tok = write_tiny_tokenizer(tok_dir, model_max_length=L)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=D, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=L, projection_dim=D,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    prior = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                       embedding_dim=D, num_embeddings=L,
                                       additional_embeddings=4)
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=2, clip_embeddings_dim=D,
                                    time_embed_dim=64, cross_attention_dim=24)
    decoder = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=6, cross_attention_dim=24,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity", **_unet_common())
    sr = dict(sample_size=16, in_channels=6, out_channels=3, add_attention=False,
              down_block_types=("ResnetDownsampleBlock2D",) * 2,
              up_block_types=("ResnetUpsampleBlock2D",) * 2, **_unet_common())
    first, last = diffusers.UNet2DModel(**sr), diffusers.UNet2DModel(**sr)
    with torch.no_grad():  # every tensor non-trivial (diffusers zero-inits some), so a mix-up shows
        for m in (text_encoder, prior, text_proj, decoder, first, last):
            for name, p in m.named_parameters():
                p.add_(0.2 * torch.randn_like(p))
        prior.clip_std.abs_().add_(0.5)
    sched = lambda **kw: diffusers.UnCLIPScheduler(num_train_timesteps=1000, **kw)  # noqa: E731
    pipe = diffusers.UnCLIPPipeline(
        prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder,
        tokenizer=tok, super_res_first=first, super_res_last=last,
        prior_scheduler=sched(variance_type="fixed_small_log", prediction_type="sample",
                              clip_sample_range=5.0),
        decoder_scheduler=sched(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=sched(variance_type="fixed_small_log", prediction_type="epsilon"))
    pipe.save_pretrained(src)
    return src, pipe


VISION_SIZE = 16      # the tiny vision tower's input size


def build_tiny_variations(root, pipe):
    """Karlo's image-variations layout (UnCLIPImageVariationPipeline) around `pipe`'s decoder,
    text and super-resolution components, with a tiny random CLIPVisionModelWithProjection of
    the text encoder's projection width, saved under root/variations; returns (dir, pipeline)."""
    from diffusers import UnCLIPImageVariationPipeline

    torch.manual_seed(1)
    image_encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=VISION_SIZE, patch_size=8, projection_dim=D))
    with torch.no_grad():
        for _, p in image_encoder.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
    fe = transformers.CLIPImageProcessor(crop_size=VISION_SIZE,
                                         size={"shortest_edge": VISION_SIZE})
    vpipe = UnCLIPImageVariationPipeline(
        decoder=pipe.decoder, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        text_proj=pipe.text_proj, feature_extractor=fe, image_encoder=image_encoder,
        super_res_first=pipe.super_res_first, super_res_last=pipe.super_res_last,
        decoder_scheduler=pipe.decoder_scheduler, super_res_scheduler=pipe.super_res_scheduler)
    out = str(root / "variations")
    vpipe.save_pretrained(out)
    return out, vpipe
