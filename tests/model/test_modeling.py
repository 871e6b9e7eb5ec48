import pytest
import torch
from PIL import Image

from colintern.model.modeling import ColIntern3_5


def pages(n: int = 2):
    colours = ["red", "blue", "green", "purple"]
    return [Image.new("RGB", (192, 256), colours[i % 4]) for i in range(n)]


def test_page_embeddings_shape_norm_and_image_token_mask(tiny_retriever):
    model, processor = tiny_retriever
    batch = processor.process_images(pages(3))
    with torch.no_grad():
        out = model(**batch)
    assert out.shape == (3, batch["input_ids"].shape[1], model.config.embedding_dim) == (3, out.shape[1], 128)
    norms = out.norm(dim=-1)
    image_tokens = processor.get_image_mask(batch)
    # exactly the image-context tokens survive, each unit length; prompt tokens and padding are zero
    torch.testing.assert_close(norms[image_tokens], torch.ones(int(image_tokens.sum())))
    assert bool((norms[~image_tokens] == 0).all())
    assert int(image_tokens.sum(dim=1)[0]) == model.config.image_seq_length


def test_query_embeddings_are_unit_vectors_where_attended_and_zero_on_padding(tiny_retriever):
    model, processor = tiny_retriever
    batch = processor.process_queries(["a red header", "which page has a blue pie chart and a green star?"])
    with torch.no_grad():
        out = model(**batch)
    norms = out.norm(dim=-1)
    mask = batch["attention_mask"].bool()
    assert not bool(mask.all())  # the short query is left-padded
    torch.testing.assert_close(norms[mask], torch.ones(int(mask.sum())))
    assert bool((norms[~mask] == 0).all())


def test_unmasked_page_mode_keeps_all_attended_tokens(tiny_retriever):
    model, processor = tiny_retriever
    batch = processor.process_images(pages(1))
    model.mask_non_image_embeddings = False
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        model.mask_non_image_embeddings = True
    assert int((out.norm(dim=-1) > 0).sum()) == int(batch["attention_mask"].sum())


def test_page_embeddings_do_not_depend_on_batch_composition(tiny_retriever):
    model, processor = tiny_retriever
    images = pages(4)
    with torch.no_grad():
        together = model(**processor.process_images(images))
        alone = model(**processor.process_images(images[2:3]))
    mask = alone.norm(dim=-1)[0] > 0
    torch.testing.assert_close(together[2][-alone.shape[1] :][mask], alone[0][mask], rtol=1e-4, atol=1e-5)


def test_head_initialisation_is_deterministic_and_documented(tiny_model_dir):
    a = ColIntern3_5.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(1234)  # the global RNG must not matter
    b = ColIntern3_5.from_pretrained(str(tiny_model_dir))
    assert torch.equal(a.custom_text_proj.weight, b.custom_text_proj.weight)
    assert a.head_is_untrained() and torch.all(a.custom_text_proj.bias == 0)
    assert abs(a.custom_text_proj.weight.std().item() - 0.02) < 0.002
    with torch.no_grad():
        a.custom_text_proj.weight.add_(0.01)
    assert not a.head_is_untrained()


def test_output_loading_info_returns_model_and_info_like_transformers(tiny_model_dir, tmp_path):
    model, info = ColIntern3_5.from_pretrained(str(tiny_model_dir), output_loading_info=True)
    assert isinstance(model, ColIntern3_5) and model.head_is_untrained()
    assert {"custom_text_proj.weight", "custom_text_proj.bias"} <= set(info["missing_keys"])  # a base model
    with torch.no_grad():
        model.custom_text_proj.weight.add_(0.01)
    model.save_pretrained(tmp_path)
    trained, info = ColIntern3_5.from_pretrained(tmp_path, output_loading_info=True)
    assert not trained.head_is_untrained() and not info["missing_keys"]
    torch.testing.assert_close(trained.custom_text_proj.weight, model.custom_text_proj.weight)


def test_frozen_vision_tower_builds_no_graph(tiny_retriever):
    model, processor = tiny_retriever
    batch = processor.process_images(pages(2))
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for p in [*model.vision_tower.parameters(), *model.multi_modal_projector.parameters()]:
            p.requires_grad_(False)
        model(**batch).sum().backward()
        assert all(p.grad is None for p in model.vision_tower.parameters())
        assert model.custom_text_proj.weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)


def test_embedding_dim_is_read_from_the_config(tiny_model_dir, tmp_path):
    model = ColIntern3_5.from_pretrained(str(tiny_model_dir))
    model.config.embedding_dim = 64
    small = ColIntern3_5(model.config)
    assert small.custom_text_proj.out_features == 64
    small.save_pretrained(tmp_path)
    reloaded = ColIntern3_5.from_pretrained(tmp_path)
    assert reloaded.config.embedding_dim == 64 and reloaded.custom_text_proj.out_features == 64


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_runs_in_bf16(tiny_model_dir, dtype):
    from colintern.model.loading import load_retriever

    model, processor = load_retriever(str(tiny_model_dir), device="cpu", dtype=dtype, max_num_visual_tokens=16)
    with torch.no_grad():
        out = model(**processor.process_images(pages(1)))
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
