"""Every chapter executes end to end with PROFILE="quick" (papermill), into _build/quick/executed."""

import pytest
from book import EXECUTED, chapters, execute, failing_cell

pytestmark = pytest.mark.notebooks


@pytest.mark.parametrize("chapter", chapters(), ids=str)
def test_chapter_executes(chapter):
    import papermill

    try:
        execute(chapter, profile="quick")
    except papermill.PapermillExecutionError:
        pytest.fail(f"{chapter}: {failing_cell(EXECUTED / chapter)}", pytrace=False)
