"""Write the small Chinese test corpus and a CLUE-layout classification task (tests/assets/zh/).

    python tools/build_zh_corpus.py --output tests/assets/zh

Everything is generated here, deterministically (a seeded random.Random), from a grammar over word
lists written for this project: no third-party text. Sentences are built from multi-character words
(体育 比赛, 人工智能 ...) that repeat across documents, so that whole-word masking differs from token
masking, and they mix in what a Chinese corpus holds besides Han characters: digit runs (2023年, 35%),
Latin words (NBA, Python), full-width punctuation (，、。！？), quotes (“”) and ASCII spaces.

Outputs under --output:
    corpus.jsonl        {"text": ...} per line: the pretraining corpus (--documents documents)
    tnews/train.json    CLUE's TNEWS layout, one JSON object per line (CLUE names these files .json):
    tnews/dev.json        {"label": "103", "label_des": "news_sports", "sentence": "..."}
The task's four classes are TNEWS's ids and names for the four topics; a sentence's words come from
its topic's list, so a tiny model can learn it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.errors import UserError  # noqa: E402

# topic -> (TNEWS label id, TNEWS label_des, subjects, verbs, objects)
TOPICS: Dict[str, Tuple[str, str, List[str], List[str], List[str]]] = {
    "sports": ("103", "news_sports",
               ["国家队", "篮球运动员", "足球俱乐部", "主教练", "年轻球员", "NBA球队", "乒乓球选手", "马拉松选手"],
               ["赢得了", "参加了", "完成了", "准备了", "讨论了", "输掉了"],
               ["总决赛", "友谊比赛", "冬季训练", "世界杯预选赛", "全国锦标赛", "主场比赛", "体育比赛", "奥运会资格"]),
    "finance": ("104", "news_finance",
                ["中央银行", "证券公司", "投资者", "上市公司", "保险机构", "财政部门", "基金经理", "商业银行"],
                ["公布了", "调整了", "提高了", "降低了", "分析了", "发行了"],
                ["存款利率", "季度财报", "人民币汇率", "债券市场", "股票价格", "消费贷款", "经济数据", "投资计划"]),
    "tech": ("109", "news_tech",
             ["科技公司", "研究团队", "软件工程师", "大学实验室", "互联网企业", "芯片厂商", "开发者社区", "人工智能公司"],
             ["发布了", "开发了", "测试了", "改进了", "开源了", "展示了"],
             ["人工智能模型", "智能手机", "操作系统", "Python工具", "GPU芯片", "搜索引擎", "机器翻译系统", "自动驾驶汽车"]),
    "agriculture": ("115", "news_agriculture",
                    ["农民", "农业合作社", "种植大户", "农业专家", "乡村干部", "养殖场", "果园主人", "粮食企业"],
                    ["收获了", "种植了", "推广了", "改良了", "储存了", "运输了"],
                    ["水稻", "小麦种子", "有机蔬菜", "新鲜水果", "玉米产量", "灌溉设备", "农业机械", "茶叶"]),
}
TIMES = ["今天", "昨天上午", "上周末", "去年冬天", "最近几天", "本月初", "今年春天", "明天下午"]
PLACES = ["在北京", "在上海", "在广州", "在成都", "在杭州", "在西安", "在武汉", "在南京"]
ADVERBS = ["已经", "终于", "再次", "正式", "首次", "顺利"]
CLAUSES = ["大家都很高兴", "专家认为前景很好", "记者进行了采访", "市民表示非常关注", "相关部门表示支持",
           "网友展开了热烈讨论"]
ENDS = ["。", "。", "。", "！", "？"]


def number_phrase(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"{rng.randrange(2000, 2030)}年"
    if kind == 1:
        return f"增长了{rng.randrange(1, 99)}%"
    if kind == 2:
        return f"共有{rng.randrange(2, 9999)}人参加"
    return f"达到{rng.randrange(1, 99)}.{rng.randrange(10)}万元"


def sentence(rng: random.Random, topic: str, rich: bool) -> str:
    """One sentence of `topic`; `rich` adds clauses, numbers, quotes and spaces around Latin words."""
    _, _, subjects, verbs, objects = TOPICS[topic]
    parts = [rng.choice(TIMES), rng.choice(subjects), rng.choice(PLACES), rng.choice(ADVERBS), rng.choice(verbs),
             rng.choice(objects)]
    text = "".join(parts)
    if rich:
        if rng.random() < 0.4:
            text += "，" + number_phrase(rng)
        if rng.random() < 0.3:
            text += "，" + rng.choice(CLAUSES)
        if rng.random() < 0.2:
            text = f"“{text}”"
        if rng.random() < 0.2:
            text = text.replace("NBA", " NBA ").replace("Python", " Python ").replace("GPU", " GPU ")
    return text + rng.choice(ENDS)


def build_documents(rng: random.Random, count: int) -> List[str]:
    documents = []
    names = sorted(TOPICS)
    for _ in range(count):
        main = rng.choice(names)
        sentences = [sentence(rng, main if rng.random() < 0.7 else rng.choice(names), rich=True)
                     for _ in range(rng.randrange(4, 12))]
        if rng.random() < 0.3:  # a list with the enumeration comma
            _, _, _, _, objects = TOPICS[main]
            sentences.append("主要内容包括" + "、".join(rng.sample(objects, 3)) + "等。")
        documents.append("".join(sentences))
    return documents


def build_task(rng: random.Random, count: int) -> List[dict]:
    names = sorted(TOPICS)
    rows = []
    for _ in range(count):
        topic = rng.choice(names)
        label, label_des = TOPICS[topic][:2]
        rows.append({"label": label, "label_des": label_des, "sentence": sentence(rng, topic, rich=False)})
    return rows


def write_lines(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def build_zh_corpus(output: str | Path, documents: int = 300, train: int = 400, dev: int = 100,
                    seed: int = 16) -> Dict[str, Path]:
    """Write corpus.jsonl, tnews/train.json and tnews/dev.json under `output`; their paths."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    rng = random.Random(seed)
    paths = {"corpus": output / "corpus.jsonl", "train": output / "tnews" / "train.json",
             "dev": output / "tnews" / "dev.json"}
    write_lines(paths["corpus"], [{"text": t} for t in build_documents(rng, documents)])
    write_lines(paths["train"], build_task(rng, train))
    write_lines(paths["dev"], build_task(rng, dev))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write (tests/assets/zh)")
    parser.add_argument("--documents", type=int, default=300, help="pretraining documents (default 300)")
    parser.add_argument("--train", type=int, default=400, help="task training examples (default 400)")
    parser.add_argument("--dev", type=int, default=100, help="task validation examples (default 100)")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        paths = build_zh_corpus(args.output, args.documents, args.train, args.dev, args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
