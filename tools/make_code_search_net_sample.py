"""Writes qlit's bundled CodeSearchNet sample: synthetic Python functions in the hub schema of ``code_search_net``
(config ``python``).

Columns: ``repository_name``, ``func_path_in_repository``, ``func_name``, ``whole_func_string``, ``language``,
``func_code_string`` (the function with its docstring), ``func_code_tokens`` (code tokens without the docstring and
comments), ``func_documentation_string`` (the docstring, dedented), ``func_documentation_tokens`` (tokens of its first
paragraph), ``split_name`` (``train``, ``valid`` or ``test``) and ``func_code_url``.

The functions, repositories and URLs are invented: small utilities (clamp, slugify, chunk a list, parse key=value
lines...) generated from templates written for qlit, not copied from CodeSearchNet. Run from the repository root:
``python tools/make_code_search_net_sample.py``.
"""

import ast
import io
import json
import random
import re
import tokenize
from pathlib import Path

# Each family: function names, parameter-name choices (placeholder -> options), signature, bodies (one is picked),
# summary lines, parameter docs, what it returns and the kind of module it lives in. ``<x>`` marks a placeholder;
# ``<name>`` is the function's own name (for recursion).
FAMILIES = [
    {
        "names": ["clamp", "clamp_value", "bound"],
        "vars": {"x": ["value", "x", "number"], "lo": ["low", "lower", "minimum"], "hi": ["high", "upper", "maximum"]},
        "sig": "<x>, <lo>, <hi>",
        "bodies": [
            'if <lo> > <hi>:\n    raise ValueError("<lo> must not exceed <hi>")\nreturn max(<lo>, min(<x>, <hi>))',
            "if <x> < <lo>:\n    return <lo>\nif <x> > <hi>:\n    return <hi>\nreturn <x>",
        ],
        "summary": [
            "Clamp <x> to the closed range [<lo>, <hi>].",
            "Limit a number so that it lies between <lo> and <hi>.",
        ],
        "params": {"x": "The number to clamp.", "lo": "Smallest allowed value.", "hi": "Largest allowed value."},
        "returns": "The clamped number.",
        "kind": "num",
    },
    {
        "names": ["slugify", "make_slug", "to_slug"],
        "vars": {"t": ["text", "value", "title"]},
        "sig": "<t>",
        "bodies": [
            '<t> = unicodedata.normalize("NFKD", <t>).encode("ascii", "ignore").decode("ascii")\n'
            '<t> = re.sub(r"[^\\w\\s-]", "", <t>).strip().lower()\nreturn re.sub(r"[-\\s]+", "-", <t>)',
            '<t> = re.sub(r"[^a-z0-9]+", "-", <t>.lower())\nreturn <t>.strip("-")',
        ],
        "summary": [
            "Turn <t> into a lowercase, URL-friendly slug.",
            "Convert a string to a slug made of letters, digits and hyphens.",
        ],
        "params": {"t": "The string to convert."},
        "returns": "The slug.",
        "kind": "text",
    },
    {
        "names": ["chunk_list", "chunked", "batches"],
        "vars": {"items": ["items", "seq", "values"], "size": ["size", "n", "batch_size"]},
        "sig": "<items>, <size>",
        "bodies": [
            'if <size> < 1:\n    raise ValueError("<size> must be positive")\n'
            "return [<items>[i:i + <size>] for i in range(0, len(<items>), <size>)]",
            "for start in range(0, len(<items>), <size>):\n    yield <items>[start:start + <size>]",
        ],
        "summary": [
            "Split <items> into consecutive chunks of at most <size> elements.",
            "Break a sequence into pieces of length <size>; the last piece may be shorter.",
        ],
        "params": {"items": "The sequence to split.", "size": "Length of each chunk."},
        "returns": "The chunks, in order.",
        "kind": "seq",
    },
    {
        "names": ["parse_pairs", "parse_kv", "parse_assignments"],
        "vars": {"t": ["text", "content", "raw"]},
        "sig": '<t>, sep="="',
        "bodies": [
            "result = {}\nfor line in <t>.splitlines():\n    line = line.strip()\n"
            '    if not line or line.startswith("#"):\n        continue\n'
            "    key, _, value = line.partition(sep)\n    result[key.strip()] = value.strip()\nreturn result",
            "pairs = (line.split(sep, 1) for line in <t>.splitlines() if sep in line)\n"
            "return {key.strip(): value.strip() for key, value in pairs}",
        ],
        "summary": [
            "Parse lines of the form key=value into a dictionary.",
            "Read key/value pairs separated by sep, one pair per line.",
        ],
        "params": {"t": "Text holding one pair per line.", "sep": "The separator between key and value."},
        "returns": "A dict mapping keys to values.",
        "kind": "conf",
    },
    {
        "names": ["flatten", "flatten_list", "deep_flatten"],
        "vars": {"n": ["nested", "items", "tree"]},
        "sig": "<n>",
        "bodies": [
            "out = []\nfor item in <n>:\n    if isinstance(item, (list, tuple)):\n"
            "        out.extend(<name>(item))\n    else:\n        out.append(item)\nreturn out"
        ],
        "summary": [
            "Flatten arbitrarily nested lists and tuples into one list.",
            "Return the leaves of <n> as a flat list, depth first.",
        ],
        "params": {"n": "A list that may contain lists or tuples."},
        "returns": "A flat list.",
        "kind": "seq",
    },
    {
        "names": ["unique", "dedupe", "unique_everseen"],
        "vars": {"items": ["items", "iterable", "values"]},
        "sig": "<items>",
        "bodies": [
            "seen = set()\nresult = []\nfor item in <items>:\n    if item not in seen:\n        seen.add(item)\n"
            "        result.append(item)\nreturn result",
            "return list(dict.fromkeys(<items>))",
        ],
        "summary": [
            "Remove duplicates from <items> while keeping the original order.",
            "Return the distinct elements of an iterable in first-seen order.",
        ],
        "params": {"items": "Hashable elements."},
        "returns": "A list without duplicates.",
        "kind": "seq",
    },
    {
        "names": ["safe_int", "to_int", "parse_int"],
        "vars": {"v": ["value", "text", "raw"], "d": ["default", "fallback"]},
        "sig": "<v>, <d>=0",
        "bodies": ["try:\n    return int(<v>)\nexcept (TypeError, ValueError):\n    return <d>"],
        "summary": [
            "Convert <v> to an int, returning <d> when that fails.",
            "Parse an integer without raising on bad input.",
        ],
        "params": {"v": "Anything int() may accept.", "d": "Value returned on failure."},
        "returns": "The parsed integer or the default.",
        "kind": "num",
    },
    {
        "names": ["camel_to_snake", "snake_case", "underscore"],
        "vars": {"s": ["name", "text", "identifier"]},
        "sig": "<s>",
        "bodies": [
            'partial = re.sub(r"(.)([A-Z][a-z]+)", r"\\1_\\2", <s>)\n'
            'return re.sub(r"([a-z0-9])([A-Z])", r"\\1_\\2", partial).lower()'
        ],
        "summary": [
            "Convert a CamelCase identifier to snake_case.",
            "Rewrite <s> from camel case to lower snake case.",
        ],
        "params": {"s": "The CamelCase string."},
        "returns": "The snake_case string.",
        "kind": "text",
    },
    {
        "names": ["snake_to_camel", "camelize", "to_camel_case"],
        "vars": {"s": ["name", "text", "word"], "u": ["upper_first", "capitalize_first"]},
        "sig": "<s>, <u>=False",
        "bodies": [
            'parts = <s>.split("_")\nhead = parts[0].capitalize() if <u> else parts[0]\n'
            'return head + "".join(part.capitalize() for part in parts[1:])'
        ],
        "summary": [
            "Convert a snake_case string to camelCase.",
            "Join the underscore-separated words of <s> in camel case.",
        ],
        "params": {"s": "The snake_case string.", "u": "Capitalise the first word as well."},
        "returns": "The camelCase string.",
        "kind": "text",
    },
    {
        "names": ["is_palindrome", "palindrome", "reads_same_backwards"],
        "vars": {"t": ["text", "word", "phrase"]},
        "sig": "<t>",
        "bodies": [
            "cleaned = [c.lower() for c in <t> if c.isalnum()]\nreturn cleaned == cleaned[::-1]",
            "left, right = 0, len(<t>) - 1\nwhile left < right:\n    if <t>[left].lower() != <t>[right].lower():\n"
            "        return False\n    left += 1\n    right -= 1\nreturn True",
        ],
        "summary": [
            "Check whether <t> reads the same forwards and backwards.",
            "Return True if the string is a palindrome.",
        ],
        "params": {"t": "The string to test."},
        "returns": "True for a palindrome.",
        "kind": "text",
    },
    {
        "names": ["count_words", "word_counts", "word_frequencies"],
        "vars": {"t": ["text", "document", "body"]},
        "sig": "<t>",
        "bodies": [
            'counts = {}\nfor word in <t>.lower().split():\n    word = word.strip(".,;:!?")\n    if word:\n'
            "        counts[word] = counts.get(word, 0) + 1\nreturn counts",
            'return collections.Counter(word.strip(".,;:!?") for word in <t>.lower().split())',
        ],
        "summary": ["Count how often each word occurs in <t>.", "Build a case-insensitive word frequency table."],
        "params": {"t": "The text to count."},
        "returns": "A mapping from word to count.",
        "kind": "text",
    },
    {
        "names": ["merge_dicts", "deep_merge", "merge_config"],
        "vars": {"a": ["base", "defaults", "left"], "b": ["override", "updates", "right"]},
        "sig": "<a>, <b>",
        "bodies": [
            "merged = dict(<a>)\nfor key, value in <b>.items():\n"
            "    if isinstance(value, dict) and isinstance(merged.get(key), dict):\n"
            "        merged[key] = <name>(merged[key], value)\n    else:\n        merged[key] = value\n"
            "return merged"
        ],
        "summary": ["Recursively merge <b> into a copy of <a>.", "Deep-merge two dictionaries; values from <b> win."],
        "params": {"a": "The dictionary to start from.", "b": "Values that take precedence."},
        "returns": "A new merged dictionary.",
        "kind": "conf",
    },
    {
        "names": ["read_lines", "load_lines", "non_empty_lines"],
        "vars": {"p": ["path", "filename", "fname"]},
        "sig": "<p>",
        "bodies": [
            'with open(<p>, encoding="utf-8") as handle:\n'
            '    return [line.rstrip("\\n") for line in handle if line.strip()]'
        ],
        "summary": [
            "Read the non-blank lines of a text file.",
            "Return the lines of <p> without newlines, skipping empty ones.",
        ],
        "params": {"p": "Path to a UTF-8 text file."},
        "returns": "A list of lines.",
        "kind": "io",
    },
    {
        "names": ["percent", "percentage", "ratio_percent"],
        "vars": {"a": ["part", "count", "done"], "b": ["total", "whole"], "d": ["digits", "ndigits"]},
        "sig": "<a>, <b>, <d>=1",
        "bodies": ["if not <b>:\n    return 0.0\nreturn round(100.0 * <a> / <b>, <d>)"],
        "summary": [
            "Express <a> as a percentage of <b>.",
            "Compute a rounded percentage, returning 0 for an empty total.",
        ],
        "params": {"a": "The part.", "b": "The whole.", "d": "Number of decimal places."},
        "returns": "The percentage as a float.",
        "kind": "num",
    },
    {
        "names": ["human_bytes", "format_size", "sizeof_fmt"],
        "vars": {"n": ["size", "num", "nbytes"]},
        "sig": "<n>",
        "bodies": [
            'for unit in ("B", "KB", "MB", "GB", "TB"):\n    if abs(<n>) < 1024:\n'
            '        return "%.1f %s" % (<n>, unit)\n    <n> /= 1024.0\nreturn "%.1f PB" % <n>'
        ],
        "summary": [
            "Format a byte count as a human readable string.",
            "Return <n> bytes in the largest fitting unit, e.g. 1.5 MB.",
        ],
        "params": {"n": "Number of bytes."},
        "returns": "A string such as '3.2 KB'.",
        "kind": "num",
    },
    {
        "names": ["first", "first_or_default", "head"],
        "vars": {"items": ["items", "iterable", "values"], "d": ["default", "fallback"]},
        "sig": "<items>, <d>=None",
        "bodies": ["for item in <items>:\n    return item\nreturn <d>", "return next(iter(<items>), <d>)"],
        "summary": [
            "Return the first element of <items>, or <d> if it is empty.",
            "Get the first item of an iterable without raising StopIteration.",
        ],
        "params": {"items": "Any iterable.", "d": "Returned when there is no element."},
        "returns": "The first element or the default.",
        "kind": "seq",
    },
    {
        "names": ["normalize_whitespace", "squash_spaces", "collapse_whitespace"],
        "vars": {"t": ["text", "value", "s"]},
        "sig": "<t>",
        "bodies": ['return " ".join(<t>.split())', 'return re.sub(r"\\s+", " ", <t>).strip()'],
        "summary": [
            "Collapse runs of whitespace in <t> into single spaces.",
            "Strip a string and replace internal whitespace with one space.",
        ],
        "params": {"t": "The string to clean."},
        "returns": "The normalised string.",
        "kind": "text",
    },
    {
        "names": ["mean", "average", "arithmetic_mean"],
        "vars": {"v": ["values", "numbers", "data"]},
        "sig": "<v>",
        "bodies": ['if not <v>:\n    raise ValueError("mean of empty sequence")\nreturn sum(<v>) / float(len(<v>))'],
        "summary": ["Return the arithmetic mean of <v>.", "Average a non-empty sequence of numbers."],
        "params": {"v": "A non-empty sequence of numbers."},
        "returns": "The mean as a float.",
        "kind": "num",
    },
    {
        "names": ["ensure_dir", "mkdir_p", "make_dirs"],
        "vars": {"p": ["path", "directory", "folder"]},
        "sig": "<p>",
        "bodies": [
            "if not os.path.isdir(<p>):\n    os.makedirs(<p>)\nreturn <p>",
            "try:\n    os.makedirs(<p>)\nexcept OSError:\n    if not os.path.isdir(<p>):\n        raise\nreturn <p>",
        ],
        "summary": [
            "Create <p> and its parents if they do not exist yet.",
            "Make sure a directory exists, like mkdir -p.",
        ],
        "params": {"p": "The directory to create."},
        "returns": "The same path.",
        "kind": "io",
    },
    {
        "names": ["truncate", "shorten", "ellipsize"],
        "vars": {"t": ["text", "value", "s"], "w": ["width", "max_length", "limit"]},
        "sig": '<t>, <w>, suffix="..."',
        "bodies": ["if len(<t>) <= <w>:\n    return <t>\nreturn <t>[:max(0, <w> - len(suffix))] + suffix"],
        "summary": [
            "Cut <t> to at most <w> characters, ending with suffix when shortened.",
            "Shorten a string to a maximum length and mark the cut.",
        ],
        "params": {"t": "The string to shorten.", "w": "Maximum length of the result.", "suffix": "Marker for a cut."},
        "returns": "The possibly shortened string.",
        "kind": "text",
    },
    {
        "names": ["invert_dict", "reverse_mapping", "swap_keys_values"],
        "vars": {"m": ["mapping", "d", "table"]},
        "sig": "<m>",
        "bodies": [
            "return {value: key for key, value in <m>.items()}",
            "inverted = {}\nfor key, value in <m>.items():\n    inverted[value] = key\nreturn inverted",
        ],
        "summary": ["Swap the keys and values of <m>.", "Return a dictionary mapping each value back to its key."],
        "params": {"m": "A dictionary with hashable values."},
        "returns": "The inverted dictionary.",
        "kind": "seq",
    },
    {
        "names": ["median", "middle_value", "calc_median"],
        "vars": {"v": ["values", "numbers", "samples"]},
        "sig": "<v>",
        "bodies": [
            "ordered = sorted(<v>)\nmid = len(ordered) // 2\nif len(ordered) % 2:\n    return ordered[mid]\n"
            "return (ordered[mid - 1] + ordered[mid]) / 2.0"
        ],
        "summary": ["Return the median of <v>.", "Compute the middle value of a list of numbers."],
        "params": {"v": "A non-empty sequence of numbers."},
        "returns": "The median.",
        "kind": "num",
    },
    {
        "names": ["file_extension", "get_extension", "ext_of"],
        "vars": {"p": ["path", "filename", "name"]},
        "sig": "<p>",
        "bodies": ['return os.path.splitext(<p>)[1].lstrip(".").lower()'],
        "summary": ["Return the lowercase extension of <p> without the dot.", "Get a file's extension, e.g. 'csv'."],
        "params": {"p": "A file name or path."},
        "returns": "The extension, or an empty string.",
        "kind": "io",
    },
    {
        "names": ["pairwise", "adjacent_pairs", "window2"],
        "vars": {"items": ["items", "seq", "points"]},
        "sig": "<items>",
        "bodies": ["return list(zip(<items>, <items>[1:]))"],
        "summary": [
            "Return consecutive pairs (a, b), (b, c), ... from <items>.",
            "Pair every element of a sequence with the one after it.",
        ],
        "params": {"items": "A sequence."},
        "returns": "A list of 2-tuples.",
        "kind": "seq",
    },
    {
        "names": ["get_bool", "getboolean", "flag"],
        "cls": ["Config", "Settings", "Options"],
        "vars": {
            "k": ["key", "name", "option"],
            "d": ["default", "fallback"],
            "store": ["data", "values", "_settings"],
        },
        "sig": "self, <k>, <d>=False",
        "bodies": [
            "value = self.<store>.get(<k>)\nif value is None:\n    return <d>\n"
            'return str(value).strip().lower() in ("1", "true", "yes", "on")'
        ],
        "summary": [
            "Read the option <k> as a boolean.",
            "Interpret a stored setting such as 'yes' or '0' as True or False.",
        ],
        "params": {"k": "The option name.", "d": "Returned when the option is missing."},
        "returns": "The boolean value.",
        "kind": "conf",
    },
    {
        "names": ["elapsed", "seconds_since_start", "duration"],
        "cls": ["Timer", "Stopwatch", "Clock"],
        "vars": {"start": ["start", "_started", "t0"]},
        "sig": "self",
        "bodies": ["if self.<start> is None:\n    return 0.0\nreturn time.time() - self.<start>"],
        "summary": [
            "Return the number of seconds since the timer was started.",
            "Seconds elapsed since start, or 0 if it never ran.",
        ],
        "params": {},
        "returns": "Elapsed time in seconds.",
        "kind": "num",
    },
]

REPOS = [
    "tallow/pyutils",
    "kestrel-labs/textkit",
    "mbrandt/tidy",
    "orrin-dev/smallbox",
    "fenwick/datatools",
    "nadiak/quickconf",
    "ulla-s/helpers",
    "gormtech/batchy",
    "pelladata/etl-lite",
    "selwyn/strtools",
    "brightwell/cli-kit",
    "jorunnh/notebook-tools",
]
MODULES = {
    "num": ["numbers.py", "mathutils.py", "stats.py"],
    "text": ["text.py", "strings.py", "formatting.py"],
    "seq": ["collections.py", "iterutils.py", "lists.py"],
    "io": ["files.py", "fsutils.py", "io.py"],
    "conf": ["config.py", "settings.py", "parsing.py"],
}
SKIP = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT, tokenize.ENDMARKER}


def fill(template: str, names: dict[str, str]) -> str:
    return re.sub(r"<(\w+)>", lambda m: names.get(m.group(1), m.group(0)), template)


def docstring(fam: dict, names: dict[str, str], rng: random.Random) -> str:
    """The docstring body, indented for a function at column 0: one line, Google or Sphinx style."""
    summary = fill(rng.choice(fam["summary"]), names)
    style = rng.choice(["oneline", "google", "sphinx"])
    params = {names.get(k, k): v for k, v in fam["params"].items()}
    if style == "oneline":
        return summary
    if style == "google":
        lines = [summary, ""]
        if params:
            lines += ["Args:"] + [f"    {k}: {v}" for k, v in params.items()] + [""]
        lines += ["Returns:", "    " + fam["returns"]]
    else:
        lines = [summary, ""] + [f":param {k}: {v}" for k, v in params.items()] + [":returns: " + fam["returns"]]
    return "\n".join(("    " + line) if line else "" for line in lines).lstrip() + "\n    "


def code_tokens(code: str) -> list[str]:
    """Tokens of ``code`` without its docstring, comments and layout tokens (as in CodeSearchNet)."""
    doc = ast.parse(code).body[0].body[0]
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type in SKIP or (tok.type == tokenize.STRING and tok.start == (doc.lineno, doc.col_offset)):
            continue
        out.append(tok.string)
    return out


def doc_tokens(doc: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", doc.split("\n\n")[0])


def make_row(rng: random.Random, shas: dict[str, str]) -> dict:
    fam = rng.choice(FAMILIES)
    name = rng.choice(fam["names"])
    names = {k: rng.choice(v) for k, v in fam["vars"].items()} | {"name": name}
    sig = fill(fam["sig"], names)
    body = "\n".join(("    " + line) for line in fill(rng.choice(fam["bodies"]), names).split("\n"))
    code = f'def {name}({sig}):\n    """{docstring(fam, names, rng)}"""\n{body}'
    func = ast.parse(code).body[0]
    repo = rng.choice(REPOS)
    package = repo.split("/")[1].replace("-", "_")
    path = rng.choice(
        [
            f"{package}/{rng.choice(MODULES[fam['kind']])}",
            rng.choice(MODULES[fam["kind"]]),
            f"src/{package}/{rng.choice(MODULES[fam['kind']])}",
        ]
    )
    start = rng.randint(5, 400)
    end = start + code.count("\n")
    doc = ast.get_docstring(func)
    return {
        "repository_name": repo,
        "func_path_in_repository": path,
        "func_name": f"{rng.choice(fam['cls'])}.{name}" if "cls" in fam else name,
        "whole_func_string": code,
        "language": "python",
        "func_code_string": code,
        "func_code_tokens": code_tokens(code),
        "func_documentation_string": doc,
        "func_documentation_tokens": doc_tokens(doc),
        "split_name": "",
        "func_code_url": f"https://github.com/{repo}/blob/{shas[repo]}/{path}#L{start}-L{end}",
    }


def main() -> None:
    rng = random.Random(20261124)
    shas = {repo: f"{rng.getrandbits(160):040x}" for repo in REPOS}
    target = Path("qlit/data/samples/code_search_net")
    target.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split, split_name, n in [("train", "train", 120), ("validation", "valid", 40), ("test", "test", 40)]:
        rows: list[dict] = []
        while len(rows) < n:
            row = make_row(rng, shas)
            if row["func_code_string"] in seen:
                continue
            seen.add(row["func_code_string"])
            rows.append(row | {"split_name": split_name})
        with open(target / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
