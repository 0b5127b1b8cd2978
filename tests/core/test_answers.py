"""One answer shape: the lung findings of an answer mirror what the preprocessing found."""

from __future__ import annotations

import dataclasses

from ctscan import schemas
from ctscan.imaging import preprocessing


def test_the_answers_lung_findings_mirror_the_preprocessings() -> None:
    found = preprocessing.LungFindings(body_fraction=0.61234, lung_fraction=0.2, lung_components=2,
                                       largest_lung_fraction=0.11, lung_balance=0.8, posterior_fraction=0.1,
                                       crop_box=(1, 2, 30, 40), contrast=0.5)
    internal = {field.name for field in dataclasses.fields(preprocessing.LungFindings)} - {"crop_box"}
    assert set(schemas.LungFindings.model_fields) == internal == set(found.as_dict())
    answer = schemas.LungFindings.model_validate(found.as_dict())
    assert answer.body_fraction == 0.6123 and answer.lung_components == 2
