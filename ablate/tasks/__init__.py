"""The task registry: the paper's five workloads (and the ETT siblings), real and embedded.

Importing this package registers every built-in task; third-party tasks come from the
``ablate.tasks`` entry-point group or from any module that uses :func:`register_task`.
"""

from ablate.tasks.base import (
    DATA_DIR_ENV,
    DOWNLOADS,
    TASKS,
    DataWarning,
    DatasetNotFoundError,
    Download,
    FolderFiles,
    Metric,
    TaskInstance,
    TaskSpec,
    data_fingerprint,
    find_task,
    get_task,
    list_tasks,
    move_to_device,
    register_download,
    register_task,
    resolve_data_dir,
)

# Built-in tasks register themselves on import.
from ablate.tasks import etth, cifar10  # noqa: E402,F401  (time series, images)
from ablate.tasks import wikitext, multi30k, imdb  # noqa: E402,F401  (text)

__all__ = [
    "DATA_DIR_ENV",
    "DOWNLOADS",
    "TASKS",
    "DataWarning",
    "DatasetNotFoundError",
    "Download",
    "FolderFiles",
    "Metric",
    "TaskInstance",
    "TaskSpec",
    "data_fingerprint",
    "find_task",
    "get_task",
    "list_tasks",
    "move_to_device",
    "register_download",
    "register_task",
    "resolve_data_dir",
]
