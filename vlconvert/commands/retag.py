"""``vlconvert retag-think``: replace the untrained ``<think>``/``</think>`` specials by plain-word tags."""

from __future__ import annotations

import click

from vlconvert.console import Reporter, handle_errors, output_options
from vlconvert.errors import UsageError, UserError


def _check_rows(report: dict) -> list[tuple[str, str]]:
    rows = [("verdict", report["verdict"])]
    for key in ("embedding", "lm_head"):
        if report.get(key):
            rows.append((f"{key} median norm", f"{report[key]['median_trained_norm']:.4g} "
                                               f"({report[key]['tensor']}, {report[key]['rows']} rows)"))
    for tag in report["tags"]:
        parts = []
        for row in tag["rows"]:
            ratio = row.get("embedding_ratio")
            text = f"{row['id']}" + (f" norm x{ratio:.2f}" if ratio is not None else "")
            if row.get("lm_head_ratio") is not None:
                text += f" / head x{row['lm_head_ratio']:.2f}"
            parts.append(text)
        kind = "atomic" if tag["atomic"] else "pieces"
        rows.append((tag["text"], f"{kind}: " + ", ".join(parts) + ("  UNTRAINED?" if tag["looks_untrained"] else "")))
    return rows


@click.command("retag-think")
@click.argument("src")
@click.option("--out", "dst", type=click.Path(file_okay=False), help="Write the retagged checkpoint here.")
@click.option("--in-place", is_flag=True, help="Rewrite SRC itself (staged next to it, then swapped in atomically).")
@click.option("--open", "open_tag", default=None, help="New opening tag.  [default: <thinking>]")
@click.option("--close", "close_tag", default=None,
              help="New closing tag (derived from --open when that is <name>).  [default: </thinking>]")
@click.option("--strategy", type=click.Choice(["plain", "special"]), default="plain", show_default=True,
              help="plain: the tags become ordinary text; special: atomic tokens at the old ids, rows initialised "
                   "to the mean of the tag's pieces.")
@click.option("--data", "data", type=click.Path(dir_okay=False), help="A training JSONL whose tags to rewrite too.")
@click.option("--data-out", type=click.Path(dir_okay=False), help="Where to write the rewritten JSONL.")
@click.option("--check", is_flag=True, help="Only report whether SRC's think tags are atomic and trained-looking.")
@click.option("--copy", "copy_files", is_flag=True, help="Copy unchanged shards instead of hard-linking them.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out / --data-out (only once complete).")
@output_options(quiet="the retagged checkpoint's path (SRC's when it is retagged already)")
@handle_errors
def retag_think_command(src: str, dst: str | None, in_place: bool, open_tag: str | None, close_tag: str | None,
                        strategy: str, data: str | None, data_out: str | None, check: bool, copy_files: bool,
                        overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Replace the <think>/</think> added tokens of the Hugging Face checkpoint SRC by plain-word tags.

    Every tokenizer file, every chat template, and (with --strategy special) the two embedding rows are
    rewritten together; unchanged shards are hard-linked. A record (vlconvert_retag.json) is written into
    the output, and running again is a no-op.

    Applies to every model family vlconvert knows (qwen3_vl, qwen3_vl_moe, qwen3, qwen3_moe, qwen2_5_vl,
    qwen3_5, qwen3_5_moe): the embedding rows are found through the family of the tensors.
    """
    from vlconvert.locate import resolve_source
    from vlconvert.retag import (
        check_jsonl_paths,
        resolve_tags,
        retag_folder,
        retag_jsonl,
        summary_rows,
        think_tag_report,
        validate_jsonl,
    )

    reporter = Reporter(as_json, quiet)
    if check:
        if dst or in_place or data or data_out:
            raise UsageError("--check only reads SRC: drop --out, --in-place, --data and --data-out")
        tags = [t for t in (open_tag, close_tag) if t]
        report = think_tag_report(resolve_source(src), tags=tags or None)
        if report["tokenizer"] is None:
            raise UserError(f"'{src}' has no tokenizer.json: nothing to check")
        reporter.summary("retag-think --check", report, _check_rows(report))
        return
    if bool(data) != bool(data_out):
        raise UsageError("--data and --data-out go together")
    if bool(dst) == in_place:
        raise UsageError("give exactly one of --out DST and --in-place")
    tags_pair = resolve_tags(open_tag, close_tag)
    if data and data_out:
        checkpoint = resolve_source(src)
        check_jsonl_paths(data, data_out, overwrite=overwrite, checkpoint=checkpoint, out=dst or checkpoint)
        validate_jsonl(data, tags_pair)  # every line checked before the checkpoint is published

    def progress(description: str, total: int):
        return reporter.bytes_progress(description, total)

    summary = retag_folder(src, dst, tags=tags_pair, strategy=strategy, in_place=in_place, overwrite=overwrite,
                           link=not copy_files, info=reporter.info, progress=progress, inputs={"--data": data})
    rows = summary_rows(summary)
    if data and data_out:
        stats = retag_jsonl(data, data_out, tags_pair, overwrite=overwrite)
        summary["data"] = stats
        rows.append(("data", f"{stats['records_changed']} of {stats['records']} records changed, "
                             f"{stats['opening_replaced']} openings and {stats['closing_replaced']} closings "
                             f"replaced ({stats['records_unbalanced']} records unbalanced) -> {data_out}"))
    reporter.summary("retag-think", summary, rows)
