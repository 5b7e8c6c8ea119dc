from __future__ import annotations


def test_dataset_file_error_survives_pickling_from_loader_workers():
    import pickle

    from densehybrid.data.datasets._io import DatasetFileError

    err = DatasetFileError("/data/x.png", "Expected label '/data/x.png' to exist, but it is missing.", "Re-download.")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is DatasetFileError
    assert (back.path, back.problem, back.fix, str(back)) == (err.path, err.problem, err.fix, str(err))
