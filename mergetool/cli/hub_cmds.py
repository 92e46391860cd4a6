"""`push` and `pull`: share expert libraries on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mergetool.cli._errors import handles_errors

RepoArg = Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repo id, NAMESPACE/NAME.", show_default=False)]
TokenOpt = Annotated[Optional[str], typer.Option(
    "--token", help="Hub token (default: HF_TOKEN or the stored login).", show_default=False)]


@handles_errors
def push(
    lib: Annotated[Path, typer.Argument(metavar="LIB", help="Expert library folder.", show_default=False)],
    repo_id: RepoArg,
    private: Annotated[bool, typer.Option(
        "--private", help="Create the repo as private (an existing repo keeps its visibility).")] = False,
    revision: Annotated[Optional[str], typer.Option(
        "--revision", help="Branch to push to (created from main if missing).", show_default=False)] = None,
    commit_message: Annotated[Optional[str], typer.Option(
        "--commit-message", help="Commit message.", show_default=False)] = None,
    token: TokenOpt = None,
) -> None:
    """Verify an expert library, write its model card and push it to the Hub as one commit."""
    from mergetool.library import hub  # lazy: loads torch and huggingface_hub

    info = hub.push(lib, repo_id, private=private, revision=revision, commit_message=commit_message, token=token)
    typer.echo(f"pushed {lib} to {repo_id}@{revision or 'main'} (commit {info.oid})")
    typer.echo(info.commit_url)


@handles_errors
def pull(
    repo_id: RepoArg,
    dir: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to create (must not exist unless --force).",
                                        show_default=False)],
    revision: Annotated[Optional[str], typer.Option(
        "--revision", help="Branch, tag or commit sha (default: main).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing library in DIR.")] = False,
    token: TokenOpt = None,
) -> None:
    """Download an expert library; it reaches DIR only after every check passed (schema, sha256, allow-list)."""
    from mergetool.library import hub  # lazy: loads torch and huggingface_hub

    path = hub.pull(repo_id, dir, revision=revision, token=token, force=force)
    typer.echo(f"pulled {repo_id}@{revision or 'main'} into {path} (verified)")


def register(app: typer.Typer) -> None:
    app.command()(push)
    app.command()(pull)
