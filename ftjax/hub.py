"""Pushing an export folder to a Hugging Face Hub model repo (``ftjax-export --push_to_hub``)."""

from __future__ import annotations

import os

from ftjax.errors import FtjaxError


class HubError(FtjaxError):
    """A push the Hub client cannot make: offline mode, a bad repo id, or the Hub's refusal."""


def check_push(repo_id: str) -> None:
    """Fail before any work when ``repo_id`` is not a Hub repo id or huggingface_hub is offline."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"--push_to_hub={repo_id}: not a Hub repo id ({e})") from None
    if constants.is_offline_mode():
        raise HubError(f"--push_to_hub={repo_id}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, "
                       "which keeps huggingface_hub off the network; unset it to upload")


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, endpoint: str | None = None,
                private: bool = False, message: str = "ftjax export") -> str:
    """Upload every file of the local ``folder`` to the model repo ``repo_id`` (created when it
    does not exist) at ``endpoint`` (default: ``HF_ENDPOINT`` or huggingface.co); returns the
    repo's URL. The token is huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_push(repo_id)
    api = HfApi(endpoint=endpoint)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=message)
    except HfHubHTTPError as e:
        raise HubError(f"--push_to_hub={repo_id}: {api.endpoint} refused the upload: "
                       f"{str(e).splitlines()[0]}") from e
    return str(url)
