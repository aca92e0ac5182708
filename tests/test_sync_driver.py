"""party/sync_driver: synchronous code on a trio task, its awaits driven by the task."""
import pytest
import trio

from shardlm.party import sync_driver


def test_drive_awaits_each_call_in_order_and_returns_the_result():
    seen = []

    async def step(i):
        await trio.sleep(0)
        seen.append(i)
        return i * i

    def program(n):
        return [sync_driver.call(step, i) for i in range(n)]

    assert trio.run(sync_driver.drive, program, 4) == [0, 1, 4, 9]
    assert seen == [0, 1, 2, 3]


def test_an_error_of_the_awaited_function_is_raised_inside_the_program():
    async def fails():
        raise ValueError("peer gone")

    def program():
        try:
            sync_driver.call(fails)
        except ValueError as exc:
            return f"caught {exc}"

    assert trio.run(sync_driver.drive, program) == "caught peer gone"


def test_cancellation_reaches_the_program_and_ends_the_drive():
    cleaned = []

    def program():
        try:
            sync_driver.call(trio.sleep, 60)
        finally:
            cleaned.append(True)

    async def main():
        with trio.move_on_after(0.05) as scope:
            await sync_driver.drive(program)
        return scope.cancelled_caught

    assert trio.run(main) and cleaned == [True]


def test_call_outside_drive_is_refused():
    with pytest.raises(RuntimeError):
        sync_driver.call(trio.sleep, 0)
