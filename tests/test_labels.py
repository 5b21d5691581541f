import pytest
import torch

from ssd300.labels import COCO_CATEGORIES, LabelMap


def test_coco2017_has_80_classes_with_gapped_ids():
    label_map = LabelMap.coco2017()
    assert label_map.num_classes == 81
    assert label_map.names[0] == "background"
    assert label_map.names[1] == "person" and label_map.category_ids[1] == 1
    assert label_map.names[12] == "stop sign" and label_map.category_ids[12] == 13
    assert label_map.names[80] == "toothbrush" and label_map.category_ids[80] == 90
    assert len(set(label_map.category_ids)) == 81


def test_labels_to_category_ids_and_back():
    label_map = LabelMap.from_categories([(7, "cat"), (3, "dog"), (100, "emu")])
    ids = label_map.labels_to_category_ids(torch.tensor([1, 2, 3, 1]))
    assert ids.tolist() == [7, 3, 100, 7]
    assert label_map.category_id_to_label() == {7: 1, 3: 2, 100: 3}


def test_checkpoint_round_trip_keeps_custom_ids():
    label_map = LabelMap.from_categories([(7, "cat"), (3, "dog")])
    restored = LabelMap.from_checkpoint(label_map.to_checkpoint())
    assert restored == label_map


def test_reference_checkpoint_label_map_with_coco_names_gets_coco_ids():
    # The reference stores only {label: name}, background included.
    reference = {"label_map": dict(enumerate(["background", *(n for _, n in COCO_CATEGORIES)]))}
    assert LabelMap.from_checkpoint(reference, num_classes=81) == LabelMap.coco2017()


def test_reference_label_map_with_custom_names_uses_label_as_id():
    restored = LabelMap.from_checkpoint({"label_map": {0: "background", 1: "widget", 2: "gadget"}})
    assert restored.names == ("background", "widget", "gadget")
    assert restored.category_ids == (0, 1, 2)


def test_missing_label_map_falls_back_by_class_count():
    assert LabelMap.from_checkpoint({}, num_classes=81) == LabelMap.coco2017()
    assert LabelMap.from_checkpoint({}, num_classes=3).names == ("background", "class_1", "class_2")


def test_class_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 classes but the model has 5"):
        LabelMap.from_checkpoint({"label_map": {0: "background", 1: "a", 2: "b"}}, num_classes=5)


def test_duplicate_category_ids_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        LabelMap.from_categories([(1, "a"), (1, "b")])
