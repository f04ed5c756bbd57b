"""The offline default's knowledge table: a small set of textbook TCM facts written for this project.

Herbs (药性 nature, 五味 flavours, 归经 meridians, 功效 actions), formulas (组成 components, 功效 actions) and
syndromes (治法 treatment principle, 代表方 representative formula), in Chinese with English glosses. The
entries are common textbook knowledge (as taught in 中药学 / 方剂学 courses) typed in by hand; no text
is copied from any data set. A fact is one (entity, attribute) pair, e.g. ("麻黄", "nature") -> "温";
`apps/tcm/data.py` turns each fact into questions of the four types and splits by fact.

Tests: `pytest tests/apps/tcm/test_tcm_data.py` (the table is checked for consistency there).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Herb:
    name: str
    gloss: str  # English gloss
    nature: str  # 药性: 寒 热 温 凉 平, optionally with 大 / 微
    flavours: tuple[str, ...]  # 五味 (微苦 = slightly bitter)
    meridians: tuple[str, ...]  # 归经 (organ names without the trailing 经)
    actions: tuple[str, ...]  # 功效, one clause each


@dataclass(frozen=True)
class Formula:
    name: str
    gloss: str
    components: tuple[str, ...]  # 组成 (the core herbs)
    actions: tuple[str, ...]  # 功效
    also: tuple[
        str, ...
    ] = ()  # herbs some textbooks add (二陈汤's 生姜): asked about never, a distractor never


@dataclass(frozen=True)
class Syndrome:
    name: str
    gloss: str
    principle: tuple[str, ...]  # 治法
    formula: str  # 代表方, a name in FORMULAS


def _herb(name, gloss, nature, flavours, meridians, actions) -> Herb:
    return Herb(
        name,
        gloss,
        nature,
        tuple(flavours.split("、")),
        tuple(meridians.split("、")),
        tuple(actions.split("，")),
    )


HERBS: tuple[Herb, ...] = (
    _herb("麻黄", "Ephedra", "温", "辛、微苦", "肺、膀胱", "发汗解表，宣肺平喘，利水消肿"),
    _herb("桂枝", "Cinnamon twig", "温", "辛、甘", "心、肺、膀胱", "发汗解肌，温通经脉，助阳化气"),
    _herb("紫苏叶", "Perilla leaf", "温", "辛", "肺、脾", "解表散寒，行气和胃"),
    _herb("生姜", "Fresh ginger", "微温", "辛", "肺、脾、胃", "解表散寒，温中止呕，温肺止咳"),
    _herb("荆芥", "Schizonepeta", "微温", "辛", "肺、肝", "解表散风，透疹，消疮"),
    _herb("防风", "Saposhnikovia root", "微温", "辛、甘", "膀胱、肝、脾", "祛风解表，胜湿止痛，止痉"),
    _herb("细辛", "Asarum", "温", "辛", "心、肺、肾", "解表散寒，祛风止痛，通窍，温肺化饮"),
    _herb("薄荷", "Mint", "凉", "辛", "肺、肝", "疏散风热，清利头目，利咽，透疹"),
    _herb("柴胡", "Bupleurum root", "微寒", "辛、苦", "肝、胆、肺", "疏散退热，疏肝解郁，升举阳气"),
    _herb("葛根", "Kudzu root", "凉", "甘、辛", "脾、胃、肺", "解肌退热，生津止渴，透疹，升阳止泻"),
    _herb("石膏", "Gypsum", "大寒", "甘、辛", "肺、胃", "清热泻火，除烦止渴"),
    _herb("知母", "Anemarrhena rhizome", "寒", "苦、甘", "肺、胃、肾", "清热泻火，滋阴润燥"),
    _herb("黄芩", "Scutellaria root", "寒", "苦", "肺、胆、脾、大肠、小肠", "清热燥湿，泻火解毒，止血，安胎"),
    _herb("黄连", "Coptis rhizome", "寒", "苦", "心、脾、胃、肝、胆、大肠", "清热燥湿，泻火解毒"),
    _herb("黄柏", "Phellodendron bark", "寒", "苦", "肾、膀胱", "清热燥湿，泻火除蒸，解毒疗疮"),
    _herb("金银花", "Honeysuckle flower", "寒", "甘", "肺、心、胃", "清热解毒，疏散风热"),
    _herb("连翘", "Forsythia fruit", "微寒", "苦", "肺、心、小肠", "清热解毒，消肿散结，疏散风热"),
    _herb("生地黄", "Raw rehmannia root", "寒", "甘", "心、肝、肾", "清热凉血，养阴生津"),
    _herb("牡丹皮", "Moutan bark", "微寒", "苦、辛", "心、肝、肾", "清热凉血，活血化瘀"),
    _herb(
        "大黄", "Rhubarb root", "寒", "苦", "脾、胃、大肠、肝、心包", "泻下攻积，清热泻火，凉血解毒，逐瘀通经"
    ),
    _herb("芒硝", "Mirabilite", "寒", "咸、苦", "胃、大肠", "泻下通便，润燥软坚，清火消肿"),
    _herb("附子", "Prepared aconite root", "大热", "辛、甘", "心、肾、脾", "回阳救逆，补火助阳，散寒止痛"),
    _herb("干姜", "Dried ginger", "热", "辛", "脾、胃、肾、心、肺", "温中散寒，回阳通脉，温肺化饮"),
    _herb(
        "肉桂", "Cinnamon bark", "大热", "辛、甘", "肾、脾、心、肝", "补火助阳，引火归元，散寒止痛，温通经脉"
    ),
    _herb(
        "人参",
        "Ginseng",
        "微温",
        "甘、微苦",
        "脾、肺、心、肾",
        "大补元气，复脉固脱，补脾益肺，生津养血，安神益智",
    ),
    _herb("黄芪", "Astragalus root", "微温", "甘", "脾、肺", "补气升阳，固表止汗，利水消肿，托毒生肌"),
    _herb("白术", "White atractylodes rhizome", "温", "苦、甘", "脾、胃", "健脾益气，燥湿利水，止汗，安胎"),
    _herb("山药", "Chinese yam", "平", "甘", "脾、肺、肾", "补脾养胃，生津益肺，补肾涩精"),
    _herb(
        "甘草",
        "Licorice root",
        "平",
        "甘",
        "心、肺、脾、胃",
        "补脾益气，清热解毒，祛痰止咳，缓急止痛，调和诸药",
    ),
    _herb("大枣", "Jujube", "温", "甘", "脾、胃、心", "补中益气，养血安神"),
    _herb("当归", "Chinese angelica root", "温", "甘、辛", "肝、心、脾", "补血活血，调经止痛，润肠通便"),
    _herb("熟地黄", "Prepared rehmannia root", "微温", "甘", "肝、肾", "补血滋阴，益精填髓"),
    _herb("白芍", "White peony root", "微寒", "苦、酸", "肝、脾", "养血调经，敛阴止汗，柔肝止痛，平抑肝阳"),
    _herb("麦冬", "Ophiopogon root", "微寒", "甘、微苦", "心、肺、胃", "养阴生津，润肺清心"),
    _herb("枸杞子", "Goji berry", "平", "甘", "肝、肾", "滋补肝肾，益精明目"),
    _herb("山茱萸", "Cornus fruit", "微温", "酸、涩", "肝、肾", "补益肝肾，收涩固脱"),
    _herb("五味子", "Schisandra fruit", "温", "酸、甘", "肺、心、肾", "收敛固涩，益气生津，补肾宁心"),
    _herb("茯苓", "Poria", "平", "甘、淡", "心、肺、脾、肾", "利水渗湿，健脾，宁心"),
    _herb("泽泻", "Alisma rhizome", "寒", "甘、淡", "肾、膀胱", "利水渗湿，泄热，化浊降脂"),
    _herb("陈皮", "Tangerine peel", "温", "苦、辛", "肺、脾", "理气健脾，燥湿化痰"),
    _herb("厚朴", "Magnolia bark", "温", "苦、辛", "脾、胃、肺、大肠", "燥湿消痰，下气除满"),
    _herb("枳实", "Immature bitter orange", "微寒", "苦、辛、酸", "脾、胃", "破气消积，化痰散痞"),
    _herb("半夏", "Pinellia rhizome", "温", "辛", "脾、胃、肺", "燥湿化痰，降逆止呕，消痞散结"),
    _herb("苦杏仁", "Bitter apricot kernel", "微温", "苦", "肺、大肠", "降气止咳平喘，润肠通便"),
    _herb("桔梗", "Platycodon root", "平", "苦、辛", "肺", "宣肺，利咽，祛痰，排脓"),
    _herb("川芎", "Chuanxiong rhizome", "温", "辛", "肝、胆、心包", "活血行气，祛风止痛"),
    _herb("丹参", "Salvia root", "微寒", "苦", "心、肝", "活血祛瘀，通经止痛，清心除烦，凉血消痈"),
    _herb("红花", "Safflower", "温", "辛", "心、肝", "活血通经，散瘀止痛"),
    _herb("桃仁", "Peach kernel", "平", "苦、甘", "心、肝、大肠", "活血祛瘀，润肠通便，止咳平喘"),
    _herb("酸枣仁", "Sour jujube seed", "平", "甘、酸", "肝、胆、心", "养心补肝，宁心安神，敛汗，生津"),
)


def _formula(name, gloss, components, actions, also="") -> Formula:
    return Formula(
        name,
        gloss,
        tuple(components.split("、")),
        tuple(actions.split("，")),
        tuple(filter(None, also.split("、"))),
    )


FORMULAS: tuple[Formula, ...] = (
    _formula("麻黄汤", "Ephedra Decoction", "麻黄、桂枝、苦杏仁、甘草", "发汗解表，宣肺平喘"),
    _formula("桂枝汤", "Cinnamon Twig Decoction", "桂枝、白芍、生姜、大枣、甘草", "解肌发表，调和营卫"),
    _formula("小柴胡汤", "Minor Bupleurum Decoction", "柴胡、黄芩、人参、半夏、甘草、生姜、大枣", "和解少阳"),
    _formula("白虎汤", "White Tiger Decoction", "石膏、知母、甘草、粳米", "清热生津"),
    _formula("大承气汤", "Major Order the Qi Decoction", "大黄、芒硝、厚朴、枳实", "峻下热结"),
    _formula("四君子汤", "Four Gentlemen Decoction", "人参、白术、茯苓、甘草", "益气健脾"),
    _formula("四物汤", "Four Substances Decoction", "熟地黄、当归、白芍、川芎", "补血调血"),
    _formula(
        "六味地黄丸", "Six-Ingredient Rehmannia Pill", "熟地黄、山茱萸、山药、泽泻、牡丹皮、茯苓", "滋阴补肾"
    ),
    _formula(
        "二陈汤",
        "Two Aged Herbs Decoction",
        "半夏、陈皮、茯苓、甘草",
        "燥湿化痰，理气和中",
        also="生姜、乌梅",
    ),
    _formula("理中丸", "Regulate the Middle Pill", "人参、干姜、白术、甘草", "温中祛寒，补气健脾"),
    _formula("四逆汤", "Frigid Extremities Decoction", "附子、干姜、甘草", "回阳救逆"),
    _formula("当归补血汤", "Chinese Angelica Decoction to Tonify the Blood", "黄芪、当归", "补气生血"),
    _formula("生脉散", "Generate the Pulse Powder", "人参、麦冬、五味子", "益气生津，敛阴止汗"),
    _formula("黄连解毒汤", "Coptis Decoction to Resolve Toxicity", "黄连、黄芩、黄柏、栀子", "泻火解毒"),
    _formula("玉屏风散", "Jade Windscreen Powder", "黄芪、白术、防风", "益气固表止汗", also="大枣"),
    _formula(
        "逍遥散",
        "Free Wanderer Powder",
        "柴胡、当归、白芍、白术、茯苓、甘草",
        "疏肝解郁，养血健脾",
        also="薄荷、生姜",
    ),
)


def _syndrome(name, gloss, principle, formula) -> Syndrome:
    return Syndrome(name, gloss, tuple(principle.split("，")), formula)


SYNDROMES: tuple[Syndrome, ...] = (
    _syndrome("风寒表实证", "Exterior excess of wind-cold", "辛温发汗，宣肺平喘", "麻黄汤"),
    _syndrome("风寒表虚证", "Exterior deficiency of wind-cold", "解肌发表，调和营卫", "桂枝汤"),
    _syndrome("少阳证", "Lesser yang (shaoyang) pattern", "和解少阳", "小柴胡汤"),
    _syndrome("气分热盛证", "Blazing heat in the qi level", "清热生津", "白虎汤"),
    _syndrome("阳明腑实证", "Yang brightness bowel excess", "峻下热结", "大承气汤"),
    _syndrome("脾胃气虚证", "Spleen and stomach qi deficiency", "益气健脾", "四君子汤"),
    _syndrome("营血虚滞证", "Deficient and stagnant nutritive blood", "补血调血", "四物汤"),
    _syndrome("肾阴虚证", "Kidney yin deficiency", "滋阴补肾", "六味地黄丸"),
    _syndrome("湿痰证", "Damp-phlegm pattern", "燥湿化痰，理气和中", "二陈汤"),
    _syndrome("脾胃虚寒证", "Spleen and stomach deficiency cold", "温中祛寒，补气健脾", "理中丸"),
    _syndrome("阳衰寒厥证", "Yang collapse with cold extremities", "回阳救逆", "四逆汤"),
    _syndrome("血虚发热证", "Fever from blood deficiency", "补气生血", "当归补血汤"),
    _syndrome("气阴两虚证", "Dual deficiency of qi and yin", "益气生津，敛阴止汗", "生脉散"),
    _syndrome("三焦火毒证", "Fire toxin in the triple burner", "泻火解毒", "黄连解毒汤"),
    _syndrome("表虚自汗证", "Exterior deficiency with spontaneous sweating", "益气固表止汗", "玉屏风散"),
    _syndrome(
        "肝郁血虚脾弱证", "Liver constraint, blood deficiency, weak spleen", "疏肝解郁，养血健脾", "逍遥散"
    ),
)

NATURES: tuple[str, ...] = ("大寒", "寒", "微寒", "凉", "平", "微温", "温", "热", "大热")
FLAVOURS: tuple[str, ...] = ("辛", "甘", "酸", "苦", "咸", "淡", "涩", "微苦")
MERIDIANS: tuple[str, ...] = (
    "肺", "大肠", "胃", "脾", "心", "小肠", "膀胱", "肾", "心包", "三焦", "胆", "肝",
)  # fmt: skip


def terms() -> tuple[str, ...]:
    """The table's words of two or more characters, each once, in table order: entity names, natures,
    flavours, meridians, action and principle clauses (the offline tokenizer makes each one token)."""
    words = [*NATURES, *FLAVOURS, *MERIDIANS]
    for herb in HERBS:
        words += [herb.name, *herb.actions]
    for formula in FORMULAS:
        words += [formula.name, *formula.components, *formula.actions]
    for syndrome in SYNDROMES:
        words += [syndrome.name, *syndrome.principle]
    return tuple(word for word in dict.fromkeys(words) if len(word) >= 2)
