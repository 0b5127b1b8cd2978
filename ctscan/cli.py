"""`ctscan` command line: data, train, evaluate, models, serve, and the services' commands.

The services plug in through entry points (see pyproject.toml), so this core module never
imports them: `ctscan.services` names what `ctscan serve NAME` runs, `ctscan.commands`
adds whole commands (the trainer's `ctscan jobs`).

Every CTScanError (and other expected failures) ends as one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from ctscan.errors import CTScanError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SERVICES_GROUP = "ctscan.services"  # name -> callable(args) that runs the service
COMMANDS_GROUP = "ctscan.commands"  # name -> callable(subparsers) that adds a command


def _source_share(text: str) -> tuple[str, float]:
    name, _, factor = text.partition("=")
    try:
        return name.strip(), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=FACTOR (a data folder's name, a number)") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _plugins(group: str) -> list[EntryPoint]:
    return sorted(entry_points(group=group), key=lambda entry: entry.name)


def _store(args: argparse.Namespace) -> Any:
    from ctscan.settings import get_store_settings
    from ctscan.storage.store import open_store

    return open_store(getattr(args, "store", None) or get_store_settings().model_store)


def _data_dir(args: argparse.Namespace) -> str:
    from ctscan.settings import get_core_settings

    return str(getattr(args, "data", None) or get_core_settings().data_dir)


def _short(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {k: metrics[k] for k in ("accuracy", "precision", "recall", "f1", "auc") if k in metrics}


# --- train --------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from ctscan.models import get_spec
    from ctscan.publishing import train_and_store
    from ctscan.settings import get_core_settings
    from ctscan.training.runs import TrainConfig

    get_spec(args.model)
    data_dirs = args.data or [str(get_core_settings().data_dir)]
    config = TrainConfig(
        model=args.model, data_dir=data_dirs[0], extra_data_dirs=data_dirs[1:], init=args.init,
        input_size=args.input_size, anatomy_balance=args.anatomy_balance,
        epochs=args.epochs, finetune_epochs=args.finetune_epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, finetune_learning_rate=args.finetune_learning_rate,
        patience=args.patience, seed=args.seed, threshold_rule=args.threshold_rule,
        limit_per_class=args.limit_per_class, report_test=args.report_test,
        augment=not args.no_augment, preprocessing=args.preprocessing, augmentation=args.augmentation,
        mixup=args.mixup, ema=args.ema, label_smoothing=args.label_smoothing, weight_decay=args.weight_decay,
        source_variants=args.source_variants, swa_epochs=args.swa_epochs,
        source_weights=dict(args.source_weight or []),
    )
    run_dir = args.run_dir or (get_core_settings().runs_dir / args.model)
    version, card, promoted = train_and_store(
        config, run_dir=run_dir, store=_store(args), resume=args.resume, promote=args.promote,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    summary = {
        "model": args.model, "version": version, "promoted": promoted, "init": args.init,
        "threshold": card.threshold, "val": _short(card.metrics.get("val")),
        "test": _short(card.metrics.get("test")), "run_dir": str(run_dir),
        "training_seconds": card.training_seconds,
    }
    print(json.dumps(summary, indent=2))
    return 0


# --- evaluate -----------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from ctscan.evaluation.reports import evaluate_store, lesion_evaluation
    from ctscan.settings import get_core_settings

    folders = args.data or [str(get_core_settings().data_dir)]
    store = _store(args)
    reports = {}
    for folder in folders:
        reports[folder] = evaluate_store(
            store=store, data_dir=folder, models=args.model, split=args.split,
            out_dir=args.out / Path(folder).name if args.out and len(folders) > 1 else args.out,
            resamples=args.resamples, robustness=args.robustness, attention=args.attention,
        )
    lesions = lesion_evaluation(store=store, data_dirs=folders, split=args.split, models=args.model,
                                baseline_folders=args.baseline_train) if args.lesions else None
    if args.json:
        if len(folders) == 1:
            report = reports[folders[0]]
            if lesions is not None:
                report["lesions"] = lesions
        else:
            report = {"datasets": {Path(f).name: r for f, r in reports.items()}, "lesions": lesions}
        print(json.dumps(report, indent=2, default=_json_default))
        return 0
    for folder, report in reports.items():
        print(f"{Path(folder).name} ({args.split}, {report['dataset']['images']} slices)")
        _print_models(report)
    if lesions is not None:
        _print_lesions(lesions)
    return 0


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _print_models(report: dict[str, Any]) -> None:
    for name, metrics in report["models"].items():
        if "error" in metrics:
            print(f"{name:12s} not evaluated: {metrics['error']}")
            continue
        line = (f"{name:12s} acc {metrics['accuracy']:.4f} prec {metrics['precision']:.4f} "
                f"rec {metrics['recall']:.4f} f1 {metrics['f1']:.4f} auc {metrics['auc']:.4f} "
                f"thr {metrics['threshold']:.3f} ece {metrics['calibration']['after']['ece']:.3f}")
        if "robustness" in metrics:
            line += f" max-flip {metrics['robustness']['max_flip_rate']:.3f}"
        if metrics.get("attention", {}).get("mean") is not None:
            line += f" gradcam-in-lungs {metrics['attention']['mean']:.3f}"
        print(line)


def _print_lesions(lesions: dict[str, Any]) -> None:
    def shown(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for name, entry in lesions["datasets"].items():
        print(f"\nlesion-true: {name} ({lesions['split']}, {entry['slices']} slices, "
              f"{entry['screened_out']} refused by the lung screening)")
        print(f"  {'row':20s} {'pooled AUC':>10s} {'within-patient':>15s} {'pairs':>6s} {'concordance':>11s} "
              f"{'clean->covid':>12s} {'recall':>7s}")
        for row, metrics in entry["rows"].items():
            inside = metrics.get("within_patient", {})
            pairs = metrics.get("matched_pairs") or {}
            served = metrics.get("served", {})
            clean, infected = served.get("clean", {}), served.get("infected", {})
            print(f"  {row:20s} {shown(metrics['pooled_auc']):>10s} {shown(inside.get('mean_auc')):>15s} "
                  f"{pairs.get('pairs', '-')!s:>6s} {shown(pairs.get('concordance')):>11s} "
                  f"{shown(clean.get('share_called_covid')):>12s} {shown(infected.get('recall')):>7s}")
        for row, metrics in entry["rows"].items():
            if metrics.get("follows"):
                print(f"  {row} follows (Spearman inside each class): "
                      + ", ".join(f"{cue} {value:+.2f}" for cue, value in metrics["follows"].items()))
        if "segmentation" in entry:
            dice = entry["segmentation"]["dice"]
            print("  lung segmentation against the radiologists' masks, Dice: "
                  + ", ".join(f"{kind} {value['mean']:.3f}" for kind, value in dice.items()))


# --- audit --------------------------------------------------------------------------------
def cmd_audit(args: argparse.Namespace) -> int:
    from ctscan.data.shortcut_audit import audit_dataset
    from ctscan.settings import get_core_settings

    folders = args.data or [str(get_core_settings().data_dir)]
    if args.lung_features:
        return _lung_feature_audit(args, folders)
    if len(folders) > 1:
        raise CTScanError("the shortcut audit reads one data set (--data once); several go with --lung-features")
    report = audit_dataset(folders[0], preprocessing=args.preprocessing,
                           splits=args.split or None, resamples=args.resamples)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['images']} images of {report['data']} ({', '.join(report['splits'])}); "
              f"preprocessing {report['preprocessing']}")
        for cue_set, result in report["cue_sets"].items():
            low, high = result["ci95"]
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(result["single_cues"].items())[:3])
            print(f"  {cue_set:12s} cue-only AUC {result['auc']:.3f} [{low:.3f}-{high:.3f}]  strongest: {top}")
    for warning in report["warnings"]:
        print(f"ctscan: warning: {warning}", file=sys.stderr)
    return 0


def _lung_feature_audit(args: argparse.Namespace, folders: list[str]) -> int:
    from ctscan.evaluation.lesion_metrics import lung_feature_audit

    report = lung_feature_audit(folders, args.split or ("train", "val", "test"))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    names = report["features"]
    print("AUC of untrained lung features (lung-v1; above 0.5: higher on COVID-19 slices)")
    print(f"{'split':32s} " + " ".join(f"{n:>9s}" for n in names))
    for split, row in report["splits"].items():
        cells = " ".join(f"{v:9.3f}" if v is not None else f"{'-':>9s}" for v in (row["auc"][n] for n in names))
        print(f"{split:32s} {cells}")
    print("same direction on every split: " + (", ".join(report["consistent"]) or "none"))
    return 0


# --- safety-report ------------------------------------------------------------------------
def cmd_safety_report(args: argparse.Namespace) -> int:
    from ctscan.evaluation.safety import safety_report
    from ctscan.models import ensemble_members

    data = {f"{Path(d).name}-{args.split}": (d, args.split) for d in [_data_dir(args), *args.external]}
    models = ensemble_members() if args.model == "all" else [args.model]
    print(json.dumps(safety_report(store=_store(args), data_dirs=data, models=models), indent=2))
    return 0


# --- predict ------------------------------------------------------------------------------
def _read_inputs(paths: Sequence[str], limits: Any) -> list[bytes]:
    from ctscan.study import is_zip, unpack_zip

    blobs: list[bytes] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files = [path]
        else:
            raise CTScanError(f"{text}: no such file or folder")
        for file in files:
            data = file.read_bytes()
            blobs.extend(unpack_zip(data, limits) if is_zip(data) else [data])
    if len(blobs) > limits.max_slices:
        raise CTScanError(f"{len(blobs)} files; at most {limits.max_slices} slices per study")
    return blobs


def cmd_predict(args: argparse.Namespace) -> int:
    """Print the answer the inference API would give (`ctscan.serving.answers`), or a summary of it."""
    import time
    import uuid

    from ctscan.imaging.decoding import decode_image
    from ctscan.models import ENSEMBLE, ensemble_members
    from ctscan.schemas import StudyTimings, Timings
    from ctscan.serving.answers import ensemble_version, is_calibrated, png_base64, slice_prediction, study_prediction
    from ctscan.serving.predictor import Predictor
    from ctscan.study import StudyLimits

    started = time.perf_counter()
    blobs = _read_inputs(args.paths, StudyLimits())
    decoded = [decode_image(data) for data in blobs]
    decoded_at = time.perf_counter()
    names = list(ensemble_members()) if args.model == ENSEMBLE else [args.model]
    predictor = Predictor.from_store(_store(args), names, with_ensemble=args.model == ENSEMBLE)
    rule = predictor.ensemble if args.model == ENSEMBLE else None
    # The ensemble's members are the versions its record pins, in the registry's order.
    members = predictor.ensemble_members if rule is not None else list(predictor.models.values())
    version = ensemble_version(rule.members) if rule is not None else members[0].version
    band = rule.band if rule is not None else members[0].band
    request_id = uuid.uuid4().hex
    loaded_at = time.perf_counter()
    study = len(decoded) > 1 or any(Path(p).is_dir() for p in args.paths)
    answer: Any
    if study:
        found = predictor.classify_study(decoded, model=args.model, explain_top=3 if args.explain else 0)
        answer = study_prediction(
            decision=found.decision, k=found.k, results=found.slices, positions_mm=found.positions_mm,
            upload_order=found.upload_order, heatmaps={i: png_base64(r.heatmap_png) for i, r in enumerate(found.slices)
                                                       if r.heatmap_png is not None},
            heatmap_members={i: r.heatmap_members for i, r in enumerate(found.slices) if r.heatmap_members},
            model=args.model, model_version=version, band=band, request_id=request_id,
            # Grad-CAM runs inside classify_study here; its time is part of `slices`.
            timings=StudyTimings(slices=(time.perf_counter() - loaded_at) * 1000, gradcam=None,
                                 total=(time.perf_counter() - started) * 1000),
            source_formats=[d.source_format for d in decoded])
    else:
        result = predictor.classify(decoded, model=args.model, explain=args.explain)[0]
        answer = slice_prediction(
            decision=result.decision, outputs=result.members, ensemble=rule is not None, model=args.model,
            model_version=version, findings=result.prepared.findings if result.prepared is not None else None,
            source_format=decoded[0].source_format, heatmap_png_base64=png_base64(result.heatmap_png),
            heatmap_members=result.heatmap_members, request_id=request_id, band=band,
            calibrated=is_calibrated(rule.calibration if rule is not None else None,
                                     [m.calibration for m in members]),
            # Grad-CAM runs inside classify here; its time is part of `inference`.
            timings=Timings(decode=(decoded_at - started) * 1000, inference=(time.perf_counter() - loaded_at) * 1000,
                            gradcam=None, total=(time.perf_counter() - started) * 1000))
    answer = answer.model_dump(mode="json")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    probability = answer["probability_covid"]
    shown = f"{probability:.1%}" if probability is not None else "-"
    print(f"{answer['outcome_text']} (probability of COVID-19 {shown}, threshold "
          f"{answer['threshold']:.1%})" if answer["threshold"] is not None else answer["outcome_text"])
    for reason in answer["reasons"]:
        print(f"  - {reason}")
    if study:
        print(f"  {answer['slice_count']} slices; not classified: {answer['skipped'] or 'none'}")
        strip = "".join("." if s["probability_covid"] is None else " _-=+#"[min(5, int(s["probability_covid"] * 6))]
                        for s in answer["slices"])
        print(f"  per-slice probability along the body (first slice first): {strip}")
    print(f"  {answer['disclaimer']}")
    return 0


# --- data ---------------------------------------------------------------------------------
def cmd_data_verify(args: argparse.Namespace) -> int:
    from ctscan.data.dataset import CTDataset

    dataset = CTDataset(args.dir)
    checked = dataset.verify_checksums()
    print(json.dumps({"path": str(dataset.root), "checked": checked, "counts": dataset.counts(),
                      "fingerprint": dataset.fingerprint()}, indent=2))
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from ctscan.data.download import download_dataset

    result = download_dataset(Path(args.dest), base_url=args.base_url)
    print(json.dumps(result, indent=2))
    return 0


def cmd_data_upload(args: argparse.Namespace) -> int:
    from ctscan.data.versions import upload_dataset

    manifest = upload_dataset(Path(args.dir), args.url, version=args.version)
    print(json.dumps(manifest.model_dump(mode="json"), indent=2))
    return 0


# --- models -------------------------------------------------------------------------------
def cmd_models_list(args: argparse.Namespace) -> int:
    store = _store(args)
    listing = {}
    for name in store.list_models():
        production = store.production(name)
        versions = []
        for version in store.list_versions(name):
            card = store.card(name, version)
            versions.append({"version": version, "production": version == production,
                             "val": _short(card.metrics.get("val")),
                             "test": _short(card.metrics.get("test")),
                             "onnx": store.has_onnx(name, version)})
        listing[name] = versions
    print(json.dumps(listing, indent=2))
    return 0


def _recalibration(record: Any, name: str, version: str) -> tuple[bool, list[str] | None]:
    """Whether promoting `version` of `name` asks for the ensemble to be fitted again, and
    with which members: None for the floors' choice (a floors record: the new version may
    now clear them or fail them), else the record's explicit members (records from before
    the floors' choice count as explicit)."""
    if record is None:
        return False, None
    if record.members_rule == "floors":
        return record.members.get(name) != version, None
    return name in record.members and record.members[name] != version, list(record.members)


def cmd_models_promote(args: argparse.Namespace) -> int:
    from ctscan.cli_access import record_admin_action, require_admin

    store = _store(args)
    require_admin(store)
    ensemble = store.ensemble_record()
    # The ensemble serves the member versions it was calibrated for (pinned): promoting a
    # member fits it again on val in the same step, so it uses the new version at once.
    affected, members = _recalibration(ensemble, args.name, args.version)
    recalibrate = affected and not args.no_recalibrate
    if recalibrate:
        from ctscan.data.dataset import CTDataset

        CTDataset(_data_dir(args))  # a missing or broken data set fails before anything changes
    store.promote(args.name, args.version, reason="promoted by an admin")
    record_admin_action("promote", model=args.name, model_version=args.version)
    print(f"{args.name}: production is now {args.version}")
    kept = ", ".join(f"{n} {v}" for n, v in (ensemble.members.items() if ensemble is not None else ()))
    if recalibrate:
        from ctscan.evaluation.reports import calibrate_ensemble

        try:
            record = calibrate_ensemble(store=store, data_dir=_data_dir(args), members=members)
        except CTScanError as exc:
            print(f"the ensemble was not recalibrated ({exc}); it keeps serving the versions it was calibrated "
                  f"for ({kept}) until `ctscan models calibrate-ensemble` succeeds", file=sys.stderr)
            return 0
        record_admin_action("calibrate_ensemble", model="ensemble",
                            model_version=",".join(f"{n}={v}" for n, v in record.members.items()))
        print(f"ensemble recalibrated on val for {', '.join(f'{n} {v}' for n, v in record.members.items())}: "
              f"threshold {record.threshold:.3f}")
    elif affected:
        print(f"the ensemble keeps serving the versions it was calibrated for ({kept}) until `ctscan models "
              f"calibrate-ensemble` fits it for the new version; {args.name} alone answers with {args.version} "
              "now", file=sys.stderr)
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from ctscan.cli_access import record_admin_action, require_admin

    store = _store(args)
    require_admin(store)
    version = store.rollback(args.name)
    record_admin_action("rollback", model=args.name, model_version=version)
    print(f"{args.name}: production rolled back to {version}")
    return 0


def cmd_models_seed(args: argparse.Namespace) -> int:
    from ctscan.release import seed_store
    from ctscan.settings import get_core_settings

    release = args.release or get_core_settings().release_dir
    if release is None:
        raise CTScanError("no release folder: pass --release DIR (the shipped release is models/ in the "
                          "source tree) or set CTSCAN_RELEASE_DIR")
    result = seed_store(Path(release), _store(args))
    print(json.dumps(result, indent=2))
    return 0


def cmd_models_calibrate(args: argparse.Namespace) -> int:
    from ctscan.evaluation.reports import calibrate_ensemble

    folders = args.data or [str(_data_dir(args))]
    members = [name.strip() for name in args.members.split(",") if name.strip()] if args.members else None
    record = calibrate_ensemble(store=_store(args), data_dir=folders[0], extra_data_dirs=folders[1:],
                                members=members)
    print(json.dumps(record.model_dump(mode="json"), indent=2))
    return 0


def cmd_models_export_onnx(args: argparse.Namespace) -> int:
    from ctscan.publishing import export_missing_onnx

    result = export_missing_onnx(_store(args), data_dir=Path(_data_dir(args)), models=args.model or None,
                                 version=args.version)
    print(json.dumps(result, indent=2))
    return 1 if result["failed"] else 0


# --- services (entry points) --------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    entry = next(e for e in _plugins(SERVICES_GROUP) if e.name == args.service)
    status = entry.load()(args)
    return int(status or 0)


def build_parser() -> argparse.ArgumentParser:
    from ctscan.data.dataset import AUGMENTATIONS
    from ctscan.imaging.preprocessing import DEFAULT_PREPROCESSING, PREPROCESSORS
    from ctscan.metrics import THRESHOLD_RULES
    from ctscan.models import architecture_names

    names = ", ".join(architecture_names())
    parser = argparse.ArgumentParser(prog="ctscan", description=__doc__)
    parser.add_argument("--env", metavar="FILE", help="read variables from FILE first, e.g. var/dev.env that "
                        "`make up` writes: the CLI then uses the running dev stack's store, audit folder and queue")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which store, audit folder, data set and queue this command line uses")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train one model and save it to the model store")
    train.add_argument("--model", required=True, help=f"one of {names}")
    train.add_argument("--data", action="append",
                       help="dataset folder (default: CTSCAN_DATA_DIR); repeat it to train on several "
                            "sources at once (their train splits; selection on the worst val source)")
    train.add_argument("--anatomy-balance", action="store_true",
                       help="weight slices so that where a slice lies in the chest cannot predict its label")
    train.add_argument("--source-weight", action="append", type=_source_share, metavar="NAME=FACTOR",
                       help="scale one source's total weight (default: every source alike), e.g. "
                            "ucsd-covid-ct=2; NAME is the data folder's name")
    train.add_argument("--init", default="imagenet", help="imagenet | none | PATH to backbone weights")
    train.add_argument("--input-size", type=_positive_int)
    train.add_argument("--epochs", type=_positive_int, default=30)
    train.add_argument("--finetune-epochs", type=_positive_int)
    train.add_argument("--batch-size", type=_positive_int, default=16)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--finetune-learning-rate", type=float, default=1e-5)
    train.add_argument("--patience", type=_positive_int, default=8)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="youden")
    train.add_argument("--limit-per-class", type=_positive_int, help="use a small subset (smoke runs)")
    train.add_argument("--preprocessing", choices=tuple(PREPROCESSORS), default=DEFAULT_PREPROCESSING,
                       help="what the model sees of a slice (lung-v1: lung crop, standardised intensity)")
    train.add_argument("--augmentation", choices=AUGMENTATIONS[1:], default="domain",
                       help="basic: geometry, brightness, contrast; domain: also window, gamma, "
                            "resolution, blur, noise, JPEG; lesion: domain with crops down to a third")
    train.add_argument("--no-augment", action="store_true", help="train without augmentation")
    train.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(alpha, alpha); 0 = off")
    train.add_argument("--ema", action="store_true", help="keep and select the weights' moving average")
    train.add_argument("--label-smoothing", type=float, default=0.0)
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay; 0 = Adam")
    train.add_argument("--swa-epochs", type=int, default=0,
                       help="average the weights of the last N epochs (stochastic weight averaging); 0 = off")
    train.add_argument("--source-variants", type=_positive_int, default=1,
                       help="copies of each training slice shifted/rotated/rescaled/re-windowed before "
                            "preprocessing (one drawn per epoch); 1 = none")
    train.add_argument("--report-test", action="store_true",
                       help="evaluate once on the test split for the model card (final report only)")
    train.add_argument("--run-dir", type=Path)
    train.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    train.add_argument("--promote", choices=("auto", "always", "never"), default="auto")
    train.add_argument("--store", help="model store (default: CTSCAN_MODEL_STORE)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate production models on a split")
    evaluate.add_argument("--model", default="all", help=f"all or one of {names}")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--data", action="append",
                          help="dataset folder (default: CTSCAN_DATA_DIR); repeat it for several")
    evaluate.add_argument("--lesions", action="store_true",
                          help="lesion-true numbers too: within-patient AUC, matched-pair concordance, "
                               "served outcomes, and the density and histogram baselines")
    evaluate.add_argument("--baseline-train", action="append",
                          help="train split(s) for the histogram baseline (default: the models' sources)")
    evaluate.add_argument("--store")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--out", type=Path, help="folder for ROC and confusion-matrix PNGs")
    evaluate.add_argument("--resamples", type=_positive_int, default=1000)
    evaluate.add_argument("--robustness", action="store_true",
                          help="label flip rate and AUC under benign changes (brightness, window, JPEG, ...)")
    evaluate.add_argument("--attention", action="store_true",
                          help="share of Grad-CAM mass inside the lungs on COVID slices")
    evaluate.set_defaults(func=cmd_evaluate)

    audit = sub.add_parser("audit", help="can non-clinical cues (file format, size, intensity) predict the labels?")
    audit.add_argument("--data", action="append",
                       help="dataset folder (default: CTSCAN_DATA_DIR); several with --lung-features")
    audit.add_argument("--lung-features", action="store_true",
                       help="AUC of untrained lung features (density, ground glass, texture) on every split "
                            "of every --data: where do the sources' labels disagree about what infection looks like?")
    audit.add_argument("--preprocessing", choices=tuple(PREPROCESSORS), default=DEFAULT_PREPROCESSING,
                       help="preprocessing whose output the model_input cues are measured on")
    audit.add_argument("--split", action="append", choices=("train", "val", "test"),
                       help="audit only these splits (repeatable; default: all)")
    audit.add_argument("--resamples", type=_positive_int, default=1000)
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=cmd_audit)

    safety = sub.add_parser("safety-report", help="how often the served models refuse, or call indeterminate, "
                                                  "real chest-CT slices and non-CT images")
    safety.add_argument("--model", default="all", help=f"all or one of {names}")
    safety.add_argument("--data", help="dataset folder (default: CTSCAN_DATA_DIR)")
    safety.add_argument("--external", action="append", default=[], help="more dataset folders (repeatable)")
    safety.add_argument("--split", default="test", choices=("train", "val", "test"))
    safety.add_argument("--store")
    safety.set_defaults(func=cmd_safety_report)

    predict = sub.add_parser("predict", help="classify a slice, a study folder or a ZIP without the service")
    predict.add_argument("paths", nargs="+", help="DICOM/PNG/JPEG files, folders of a study, or ZIPs of a series")
    predict.add_argument("--model", default="ensemble", help=f"ensemble or one of {', '.join(architecture_names())}")
    predict.add_argument("--explain", action="store_true", help="add Grad-CAM heatmaps (base64 PNG in --json)")
    predict.add_argument("--store")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=cmd_predict)

    data = sub.add_parser("data", help="dataset commands").add_subparsers(dest="data_command", required=True)
    verify = data.add_parser("verify", help="check split.csv and SHA256SUMS")
    verify.add_argument("dir")
    verify.set_defaults(func=cmd_data_verify)
    download = data.add_parser("download", help="download UCSD COVID-CT and write split.csv")
    download.add_argument("dest")
    download.add_argument("--base-url", default=None, help="mirror of the UCSD-AI4H/COVID-CT repository")
    download.set_defaults(func=cmd_data_download)
    upload = data.add_parser("upload", help="publish a dataset version to S3 (or a datasets folder)")
    upload.add_argument("dir")
    upload.add_argument("url", help="s3://bucket/prefix/datasets/<name>")
    upload.add_argument("--version")
    upload.set_defaults(func=cmd_data_upload)

    models = sub.add_parser("models", help="model store commands").add_subparsers(dest="models_command", required=True)
    listing = models.add_parser("list")
    listing.add_argument("--store")
    listing.set_defaults(func=cmd_models_list)
    promote = models.add_parser("promote")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--store")
    promote.add_argument("--data", help="data set whose val split recalibrates the ensemble (default CTSCAN_DATA_DIR)")
    promote.add_argument("--no-recalibrate", action="store_true",
                         help="keep the ensemble on the versions it was calibrated for until `ctscan models "
                              "calibrate-ensemble`")
    promote.set_defaults(func=cmd_models_promote)
    rollback = models.add_parser("rollback")
    rollback.add_argument("name")
    rollback.add_argument("--store")
    rollback.set_defaults(func=cmd_models_rollback)
    seed = models.add_parser("seed", help="copy the shipped release (models/) into the store")
    seed.add_argument("--release", help="release folder (default: CTSCAN_RELEASE_DIR)")
    seed.add_argument("--store")
    seed.set_defaults(func=cmd_models_seed)
    calibrate = models.add_parser("calibrate-ensemble", help="choose the ensemble threshold on val")
    calibrate.add_argument("--data", action="append",
                           help="dataset folder (default: CTSCAN_DATA_DIR); repeat it to calibrate on the val "
                                "splits of several sources")
    calibrate.add_argument("--members", help="the ensemble's members, comma-separated (overrides the promotion "
                                             "floors; default: the production models that clear them on every "
                                             "val source)")
    calibrate.add_argument("--store")
    calibrate.set_defaults(func=cmd_models_calibrate)
    export = models.add_parser("export-onnx", help="make and check the ONNX copy of versions that lack one")
    export.add_argument("--model", action="append", help=f"only this model (repeatable): {names}")
    export.add_argument("--version", help="only this version (with one --model)")
    export.add_argument("--data", help="real CT images to check the copies on (default: CTSCAN_DATA_DIR)")
    export.add_argument("--store")
    export.set_defaults(func=cmd_models_export_onnx)

    from ctscan.cli_access import add_access_commands

    add_access_commands(sub, _positive_int)

    serve = sub.add_parser("serve", help="run a service")
    serve.add_argument("service", choices=[entry.name for entry in _plugins(SERVICES_GROUP)])
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_positive_int)
    serve.add_argument("--concurrency", type=_positive_int, default=1)
    serve.set_defaults(func=cmd_serve)

    for entry in _plugins(COMMANDS_GROUP):
        try:
            add_command: Callable[[Any], None] = entry.load()
        except ImportError:  # that service's dependencies are not installed here
            continue
        add_command(sub)
    return parser


INFO_VARIABLES = ("CTSCAN_MODEL_STORE", "CTSCAN_DATASETS_URL", "CTSCAN_AUDIT_DIR", "CTSCAN_DATA_DIR",
                  "CTSCAN_RUNS_DIR", "REDIS_URL", "CELERY_BROKER_URL", "CTSCAN_TRAINER_QUEUE", "INFERENCE_URL")


def cmd_info(args: argparse.Namespace) -> int:
    """Where this command line reads and writes, and where each value came from (never a secret)."""
    from ctscan.settings import (
        get_admin_settings,
        get_audit_settings,
        get_core_settings,
        get_store_settings,
        get_trainer_settings,
    )

    from_file = set(getattr(args, "env_loaded", ()) or ())

    def origin(variable: str) -> str:
        if variable in from_file:
            return f"--env {args.env}"
        return "environment" if variable in os.environ else "default"

    trainer = get_trainer_settings()
    values = {
        "CTSCAN_MODEL_STORE": get_store_settings().model_store,
        "CTSCAN_DATASETS_URL": get_store_settings().datasets_url,
        "CTSCAN_AUDIT_DIR": str(get_audit_settings().audit_dir),
        "CTSCAN_DATA_DIR": str(get_core_settings().data_dir),
        "CTSCAN_RUNS_DIR": str(get_core_settings().runs_dir),
        "REDIS_URL": trainer.redis_url,
        "CELERY_BROKER_URL": trainer.celery_broker_url,
        "CTSCAN_TRAINER_QUEUE": trainer.queue,
        "INFERENCE_URL": os.environ.get("INFERENCE_URL", "http://127.0.0.1:8000"),
    }
    report = {name: {"value": values[name], "from": origin(name)} for name in INFO_VARIABLES}
    report["CTSCAN_ADMIN_TOKEN"] = {"value": "set" if get_admin_settings().token() else "not set",
                                    "from": origin("CTSCAN_ADMIN_TOKEN")}
    print(json.dumps(report, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if args.env:
            from ctscan.settings import load_env_file

            try:
                args.env_loaded = tuple(load_env_file(args.env))
            except OSError as exc:
                raise CTScanError(f"--env: {exc}") from None
        return func(args)
    except CTScanError as exc:
        print(f"ctscan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctscan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
