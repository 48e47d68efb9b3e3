"""Rebuilds `austen.jsonl.xz` from Debian's `r-cran-janeaustenr` package (see README.md).

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb pkg
    pip install rdata   # reads R's serialisation format; needed only here
    python -m dlax_training.data.corpus.build pkg/usr/lib/R/site-library/janeaustenr/data/Rdata

One JSON line per chapter: {"title", "chapter", "text"}. The front matter before a novel's first
chapter is kept with chapter 1; Northanger Abbey's closing editorial note is dropped.
"""

import gzip
import json
import lzma
import pathlib
import re
import sys
import warnings
import zlib

NOVELS = {  # the package's variable names, in publication order
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion"}
HEADING = re.compile(r"^(?:CHAPTER|Chapter|VOLUME) [IVXLC\d]+\s*$", re.M)


def read_novels(base: str) -> dict[str, str]:
  """The lazy-load database `Rdata.rdb`/`.rdx`: each variable is a character vector of lines."""
  import rdata
  warnings.simplefilter("ignore")
  parse = lambda raw: rdata.conversion.convert(rdata.parser.parse_data(raw))
  index = parse(gzip.decompress(pathlib.Path(base + ".rdx").read_bytes()))["variables"]
  blob = pathlib.Path(base + ".rdb").read_bytes()
  return {name: "\n".join(map(str, parse(zlib.decompress(blob[start + 4:start + size]))))
          for name, (start, size) in index.items()}


def chapters(text: str) -> list[str]:
  """Splits before each CHAPTER/VOLUME heading; a part without a chapter (the front matter, a lone
  VOLUME heading) is prepended to the next one."""
  text = text.split("\nA NOTE ON THE TEXT\n")[0]
  starts = [m.start() for m in HEADING.finditer(text)] + [len(text)]
  result, carry = [], ""
  for part in [text[:starts[0]]] + [text[a:b] for a, b in zip(starts, starts[1:])]:
    part = re.sub(r"\n{3,}", "\n\n", part).strip()
    if part.startswith(("CHAPTER", "Chapter")):
      result.append(carry + part)
      carry = ""
    elif part:
      carry += part + "\n\n"
  return result


def main(base: str, out: str = str(pathlib.Path(__file__).with_name("austen.jsonl.xz"))):
  novels = read_novels(base)
  lines = [json.dumps({"title": title, "chapter": i + 1, "text": text}, ensure_ascii=False)
           for name, title in NOVELS.items() for i, text in enumerate(chapters(novels[name]))]
  data = ("\n".join(lines) + "\n").encode()
  pathlib.Path(out).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
  print(f"{out}: {len(lines)} chapters")


if __name__ == "__main__":
  main(*sys.argv[1:])
