from acf.models.spec import infer_spec


def test_tiny_spec(tiny_model_dir):
    s = infer_spec(tiny_model_dir)
    assert s.num_layers == 2 and s.hidden_size == 64
    assert 64 in s.valid_group_sizes and 128 in s.invalid_group_sizes
