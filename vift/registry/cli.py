"""``vift predict``: answers from a registered model (``models:/<name>@champion``), fusion applied."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vift.errors import UserError
from vift.registry.loaded import load_registered


def _default_model(params_file: str) -> str | None:
    from vift.config import load_params

    path = Path(params_file)
    if not path.is_file():
        return None
    return f"models:/{load_params(path).registered_model_name()}@champion"


def cmd_predict(args: argparse.Namespace) -> int:
    model_uri = args.model or _default_model(args.params)
    if not model_uri:
        raise UserError("--model is required (no parameters file to take registry.model_name from)", exit_code=2)
    images, questions = args.image, args.question
    if len(questions) == 1 and len(images) > 1:
        questions = questions * len(images)
    if len(images) != len(questions):
        raise UserError(
            f"give one --question, or one per --image (got {len(images)} image(s), {len(questions)} question(s))",
            exit_code=2,
        )
    payload = []
    for image in images:
        path = Path(image)
        if not path.is_file():
            raise UserError(f"--image {image}: no such file")
        payload.append(path.read_bytes())
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1", exit_code=2)

    import pandas as pd

    model, info = load_registered(model_uri)
    predict_params: dict = {"fusion": not args.no_fusion}
    if args.mode:
        predict_params["mode"] = args.mode
    if args.max_new_tokens is not None:
        predict_params["max_new_tokens"] = args.max_new_tokens
    try:
        answers = model.predict(pd.DataFrame({"image": payload, "question": questions}), params=predict_params)
    except Exception as error:  # noqa: BLE001 - MlflowException for bad input; report it plainly
        raise UserError(f"prediction failed: {error}") from None
    answers = [str(a) for a in list(answers)]
    if args.json:
        print(
            json.dumps(
                {
                    "model": model_uri,
                    **({"version": info.get("version"), "run_id": info.get("run_id")} if info else {}),
                    "fusion": not args.no_fusion,
                    "mode": args.mode or "calibrated",
                    "answers": [
                        {"image": image, "question": question, "answer": answer}
                        for image, question, answer in zip(images, questions, answers)
                    ],
                },
                indent=2,
            )
        )
    else:
        print("\n".join(answers))
    return 0


def add_commands(sub, add_params_option) -> None:
    predict = sub.add_parser(
        "predict",
        help="answer questions about images with a registered model (fusion applied)",
        description="Load a registered model from the MLflow tracking URI (see `vift info`) and answer. "
        "Repeat --image/--question for several; one --question applies to every image.",
    )
    predict.add_argument("--model", help="model URI, e.g. models:/NAME@champion (default: registry.model_name@champion)")
    predict.add_argument("--image", action="append", required=True, metavar="PATH", help="image file; repeatable")
    predict.add_argument("--question", action="append", required=True, metavar="TEXT", help="question; repeatable")
    predict.add_argument("--no-fusion", action="store_true", help="answer with the plain model (no fusion)")
    predict.add_argument(
        "--mode", choices=("plain", "fused", "describe_then_answer"),
        help="inference mode (default: the one calibration chose, recorded with the model)",
    )  # fmt: skip
    predict.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate (default: the model's)")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    add_params_option(predict)
    predict.set_defaults(func=cmd_predict)
