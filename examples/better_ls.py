"""A directory listing as a flow: parse the arguments, scan, sort, render a table.

CosmoFlow's better-ls example. The scan is blocking file-system work, so that node runs
its `exec` in a worker thread (`executor="thread"`), off the trio thread; `prep` and
`post`, which use the store, stay in the node actor. A path that does not exist takes
the "invalid" route instead of failing the run.

Run it: python examples/better_ls.py [-a] [-t | -S] [-r] [PATH]
With no PATH it lists a small demo folder it makes (fixed sizes, modes and times).
"""

from __future__ import annotations

import argparse
import datetime
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cosmoflow_actors as cf


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "dir", "file" or "link"
    size: int
    mode: int
    modified: float


class ParseArgs(cf.Node):
    """Turn `argv` (a run param) into options; route "invalid" if the path is missing."""

    def exec(self, prep_res: None, ctx: cf.ExecutionContext) -> dict[str, Any]:
        parser = argparse.ArgumentParser(prog="better_ls", exit_on_error=False)
        parser.add_argument("path", nargs="?", default=".")
        parser.add_argument("-a", "--all", action="store_true", help="show hidden entries")
        order = parser.add_mutually_exclusive_group()
        order.add_argument("-t", dest="sort", action="store_const", const="time")
        order.add_argument("-S", dest="sort", action="store_const", const="size")
        parser.add_argument("-r", "--reverse", action="store_true")
        args = parser.parse_args(list(ctx.params.get("argv", [])))
        return {
            "path": args.path,
            "all": args.all,
            "sort": args.sort or "name",
            "reverse": args.reverse,
            "exists": os.path.isdir(args.path),
        }

    async def post(
        self,
        store: cf.SharedStore,
        prep_res: None,
        options: dict[str, Any],
        ctx: cf.ExecutionContext,
    ) -> str:
        await store.set("options", options)
        return "list" if options["exists"] else "invalid"


class Scan(cf.Node):
    """Read the directory: blocking calls, so exec runs in a worker thread."""

    executor = "thread"
    timeout = 10.0

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> dict[str, Any]:
        return dict(await store.get("options"))

    def exec(self, options: dict[str, Any], ctx: cf.ExecutionContext) -> list[Entry]:
        entries = []
        with os.scandir(options["path"]) as listing:
            for item in listing:
                if item.name.startswith(".") and not options["all"]:
                    continue
                info = item.stat(follow_symlinks=False)
                kind = "link" if item.is_symlink() else "dir" if item.is_dir() else "file"
                entries.append(Entry(item.name, kind, info.st_size, info.st_mode, info.st_mtime))
        return entries

    async def post(
        self, store: cf.SharedStore, options: Any, entries: list[Entry], ctx: cf.ExecutionContext
    ) -> str:
        await store.set("entries", entries)
        return "sort"


class Sort(cf.Node):
    """Directories first, then by name, time (newest first) or size (largest first)."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> dict[str, Any]:
        return await store.get_many(["options", "entries"])

    def exec(self, data: dict[str, Any], ctx: cf.ExecutionContext) -> list[Entry]:
        options, entries = data["options"], data["entries"]
        keys = {
            "name": lambda e: e.name.lower(),
            "time": lambda e: -e.modified,
            "size": lambda e: -e.size,
        }
        ordered = sorted(entries, key=keys[options["sort"]], reverse=options["reverse"])
        return sorted(ordered, key=lambda e: e.kind != "dir")  # stable: keeps the order

    async def post(
        self, store: cf.SharedStore, data: Any, entries: list[Entry], ctx: cf.ExecutionContext
    ) -> str:
        await store.set("entries", entries)
        return "render"


def human(size: int) -> str:
    """Bytes as ls -h shows them: 251 B, 4.2K, 2.4M."""
    if size < 1024:
        return f"{size} B"
    scaled = float(size)
    for unit in "KMGT":
        scaled /= 1024
        if scaled < 1024 or unit == "T":
            break
    return f"{scaled:.1f}{unit}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A table with rounded borders, like the original's `tabled` output."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(left: str, fill: str, mid: str, right: str) -> str:
        return left + mid.join(fill * (w + 2) for w in widths) + right

    def cells(row: list[str]) -> str:
        return "│" + "│".join(f" {cell:<{w}} " for cell, w in zip(row, widths, strict=True)) + "│"

    top, middle, bottom = (
        line("╭", "─", "┬", "╮"),
        line("├", "─", "┼", "┤"),
        line("╰", "─", "┴", "╯"),
    )
    return "\n".join([top, cells(header), middle, *(cells(row) for row in rows), bottom])


class Render(cf.Node):
    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[Entry]:
        return list(await store.get("entries"))

    def exec(self, entries: list[Entry], ctx: cf.ExecutionContext) -> str:
        rows = [
            [
                e.kind.upper(),
                e.name + ("/" if e.kind == "dir" else ""),
                "-" if e.kind == "dir" else human(e.size),
                stat.filemode(e.mode),
                datetime.datetime.fromtimestamp(e.modified, datetime.UTC).strftime(
                    "%Y-%m-%d %H:%M"
                ),
            ]
            for e in entries
        ]
        summary = f"{len(entries)} entries"
        if not rows:
            return summary
        return (
            table(["Type", "Name", "Size", "Permissions", "Modified (UTC)"], rows) + "\n" + summary
        )

    async def post(
        self, store: cf.SharedStore, entries: Any, text: str, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(text)


@cf.node
async def invalid(ctx: cf.ExecutionContext) -> cf.Action:
    options = await ctx.store.get("options")
    return cf.Action.complete(f"better_ls: {options['path']}: no such directory")


flow = (
    cf.Flow.builder("better-ls")
    .add_node("input", ParseArgs())
    .add_node("ls", Scan())
    .add_node("sort", Sort())
    .add_node("output", Render())
    .add_node("invalid", invalid)
    .add_route("input", "ls", action="list")
    .add_route("input", "invalid", action="invalid")
    .add_route("ls", "sort", action="sort")
    .add_route("sort", "output", action="render")
    .build()
)


def make_demo_folder(root: Path) -> Path:
    """A folder whose listing is the same on every machine."""
    folder = root / "demo"
    (folder / "src").mkdir(parents=True)
    files = {
        "README.md": 4_300,
        "Cargo.toml": 251,
        "notes.txt": 12,
        ".hidden": 3,
        "data.bin": 2_500_000,
    }
    for index, (name, size) in enumerate(files.items()):
        path = folder / name
        path.write_bytes(b"x" * size)
        path.chmod(0o644 if name != "data.bin" else 0o600)
        stamp = 1_750_000_000 + index * 3_600
        os.utime(path, (stamp, stamp))
    (folder / "latest").symlink_to("notes.txt")
    (folder / "src").chmod(0o755)
    os.utime(folder / "src", (1_749_990_000, 1_749_990_000))
    os.utime(folder / "latest", (1_750_100_000, 1_750_100_000), follow_symlinks=False)
    return folder


def main() -> list[str]:
    if len(sys.argv) > 1:  # a real listing of what the command line asks for
        result = flow.run_sync({}, params={"argv": sys.argv[1:]})
        print(result.result)
        return [str(result.result)]
    outputs = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = str(make_demo_folder(Path(tmp)))
        for argv in [[demo], ["-a", "-t", demo], ["-S", "-r", demo], [f"{demo}/missing"]]:
            result = flow.run_sync({}, params={"argv": argv})
            # Show the demo folder as <demo>: its real place differs on every run.
            print(f"$ better_ls {' '.join(argv)}".replace(demo, "<demo>"))
            print(str(result.result).replace(demo, "<demo>"))
            outputs.append(str(result.result).replace(demo, "<demo>"))
    return outputs


if __name__ == "__main__":
    main()
