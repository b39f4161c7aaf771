"""Embedded default workload: a seeded, deterministic single-turn QA dataset.

The workload is built from a small hand-written fact table (``FACTS``) covering
several domains (countries, chemical elements, books, companies, animals,
cities, programming languages, inventions).  Every (domain, entity, attribute)
triple is one *group*: all phrasings of it share one response, while

* the same phrasing template applied to another entity, and
* the same entity asked about another attribute

need a different response.  Each attribute has six phrasing slots: 0-1 are
plain frames shared by all attributes ("What is the capital of {e}?"), 2-5 are
idiomatic paraphrases ("Where is {e}'s seat of government?").  Slots 1-5 also
carry a per-domain user preamble ("Quick geography question before my quiz
...") that is the same for every entity and attribute at that slot.  So hard
negatives (same slot, another entity or attribute) are lexically almost
identical, while positives (two slots of one group) differ in both wording and
preamble.  Off-the-shelf topic embeddings (all-MiniLM-L6-v2) reach only about
0.70 ROC-AUC on the default pairs; a cache encoder has to learn to do better.

Public API: :data:`FACTS`, :data:`DOMAINS`, :func:`generate_prompts`,
:func:`generate_pairs`, :func:`generate_stream`, :func:`write_default_dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

__all__ = [
    "Domain",
    "DOMAINS",
    "FACTS",
    "generate_prompts",
    "generate_pairs",
    "generate_stream",
    "write_default_dataset",
]


@dataclass(frozen=True)
class Domain:
    """Schema of one domain.

    ``attributes``: attribute names, in the column order of the raw table.
    ``templates[attr]``: phrasings with an ``{e}`` slot for the entity.
    ``responses[attr]``: answer sentence with ``{e}`` and ``{v}`` slots.
    ``contexts[i]``: user chatter wrapped around template ``i`` of every
    attribute: a preamble, or a pattern with a ``{q}`` slot; "" for none.
    """

    attributes: tuple[str, ...]
    templates: Mapping[str, tuple[str, ...]]
    responses: Mapping[str, str]
    contexts: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# Raw fact tables.  One entity per line, fields separated by "|", in the order
# of the domain's ``attributes`` after the entity name.  A field may list
# accepted aliases separated by ";" -- the first one is the canonical answer
# used in responses.
# ---------------------------------------------------------------------------

_COUNTRIES = """
France|Paris|euro|Europe|French
Germany|Berlin|euro|Europe|German
Italy|Rome|euro|Europe|Italian
Spain|Madrid|euro|Europe|Spanish
Portugal|Lisbon|euro|Europe|Portuguese
the Netherlands|Amsterdam|euro|Europe|Dutch
Austria|Vienna|euro|Europe|German
Greece|Athens|euro|Europe|Greek
Croatia|Zagreb|euro|Europe|Croatian
Slovakia|Bratislava|euro|Europe|Slovak
Slovenia|Ljubljana|euro|Europe|Slovene;Slovenian
Lithuania|Vilnius|euro|Europe|Lithuanian
Latvia|Riga|euro|Europe|Latvian
Estonia|Tallinn|euro|Europe|Estonian
Poland|Warsaw|Polish zloty;zloty|Europe|Polish
Sweden|Stockholm|Swedish krona;krona|Europe|Swedish
Norway|Oslo|Norwegian krone;krone|Europe|Norwegian
Denmark|Copenhagen|Danish krone;krone|Europe|Danish
Iceland|Reykjavik|Icelandic krona;krona|Europe|Icelandic
Hungary|Budapest|Hungarian forint;forint|Europe|Hungarian
the Czech Republic|Prague|Czech koruna;koruna|Europe|Czech
Romania|Bucharest|Romanian leu;leu|Europe|Romanian
Serbia|Belgrade|Serbian dinar;dinar|Europe|Serbian
Ukraine|Kyiv;Kiev|Ukrainian hryvnia;hryvnia|Europe|Ukrainian
the United Kingdom|London|pound sterling;pound;British pound|Europe|English
Japan|Tokyo|Japanese yen;yen|Asia|Japanese
China|Beijing|renminbi;yuan|Asia|Mandarin Chinese;Mandarin;Chinese
South Korea|Seoul|South Korean won;won|Asia|Korean
Thailand|Bangkok|Thai baht;baht|Asia|Thai
Vietnam|Hanoi|Vietnamese dong;dong|Asia|Vietnamese
Malaysia|Kuala Lumpur|Malaysian ringgit;ringgit|Asia|Malay
Mongolia|Ulaanbaatar|Mongolian tugrik;tugrik|Asia|Mongolian
Nepal|Kathmandu|Nepalese rupee;rupee|Asia|Nepali
Bangladesh|Dhaka|Bangladeshi taka;taka|Asia|Bengali;Bangla
India|New Delhi|Indian rupee;rupee|Asia|Hindi
Iran|Tehran|Iranian rial;rial|Asia|Persian;Farsi
Saudi Arabia|Riyadh|Saudi riyal;riyal|Asia|Arabic
Jordan|Amman|Jordanian dinar;dinar|Asia|Arabic
Qatar|Doha|Qatari riyal;riyal|Asia|Arabic
Kuwait|Kuwait City|Kuwaiti dinar;dinar|Asia|Arabic
Lebanon|Beirut|Lebanese pound;pound|Asia|Arabic
Turkey|Ankara|Turkish lira;lira|Asia|Turkish
Armenia|Yerevan|Armenian dram;dram|Asia|Armenian
Uzbekistan|Tashkent|Uzbek som;som|Asia|Uzbek
Laos|Vientiane|Lao kip;kip|Asia|Lao
Cambodia|Phnom Penh|Cambodian riel;riel|Asia|Khmer
Myanmar|Naypyidaw;Nay Pyi Taw|Myanmar kyat;kyat|Asia|Burmese
Egypt|Cairo|Egyptian pound;pound|Africa|Arabic
Tunisia|Tunis|Tunisian dinar;dinar|Africa|Arabic
Nigeria|Abuja|Nigerian naira;naira|Africa|English
Ghana|Accra|Ghanaian cedi;cedi|Africa|English
Ethiopia|Addis Ababa|Ethiopian birr;birr|Africa|Amharic
Senegal|Dakar|West African CFA franc;CFA franc|Africa|French
Angola|Luanda|Angolan kwanza;kwanza|Africa|Portuguese
Mozambique|Maputo|Mozambican metical;metical|Africa|Portuguese
Zambia|Lusaka|Zambian kwacha;kwacha|Africa|English
Botswana|Gaborone|Botswana pula;pula|Africa|English
Namibia|Windhoek|Namibian dollar|Africa|English
Brazil|Brasilia;Brasília|Brazilian real;real|South America|Portuguese
Argentina|Buenos Aires|Argentine peso;peso|South America|Spanish
Chile|Santiago|Chilean peso;peso|South America|Spanish
Colombia|Bogota;Bogotá|Colombian peso;peso|South America|Spanish
Venezuela|Caracas|Venezuelan bolivar;bolivar|South America|Spanish
Uruguay|Montevideo|Uruguayan peso;peso|South America|Spanish
Ecuador|Quito|US dollar;United States dollar;dollar|South America|Spanish
Mexico|Mexico City|Mexican peso;peso|North America|Spanish
Cuba|Havana|Cuban peso;peso|North America|Spanish
Costa Rica|San Jose;San José|Costa Rican colon;colon|North America|Spanish
Guatemala|Guatemala City|Guatemalan quetzal;quetzal|North America|Spanish
Honduras|Tegucigalpa|Honduran lempira;lempira|North America|Spanish
the Dominican Republic|Santo Domingo|Dominican peso;peso|North America|Spanish
Jamaica|Kingston|Jamaican dollar;dollar|North America|English
the United States|Washington, D.C.;Washington|US dollar;United States dollar;dollar|North America|English
Australia|Canberra|Australian dollar;dollar|Oceania|English
"""

# Elements: atomic number|symbol|name.  The period is derived from the number.
_ELEMENTS = """
1|H|hydrogen
2|He|helium
3|Li|lithium
4|Be|beryllium
5|B|boron
6|C|carbon
7|N|nitrogen
8|O|oxygen
9|F|fluorine
10|Ne|neon
11|Na|sodium
12|Mg|magnesium
13|Al|aluminium;aluminum
14|Si|silicon
15|P|phosphorus
16|S|sulfur
17|Cl|chlorine
18|Ar|argon
19|K|potassium
20|Ca|calcium
21|Sc|scandium
22|Ti|titanium
23|V|vanadium
24|Cr|chromium
25|Mn|manganese
26|Fe|iron
27|Co|cobalt
28|Ni|nickel
29|Cu|copper
30|Zn|zinc
31|Ga|gallium
32|Ge|germanium
33|As|arsenic
34|Se|selenium
35|Br|bromine
36|Kr|krypton
37|Rb|rubidium
38|Sr|strontium
39|Y|yttrium
40|Zr|zirconium
41|Nb|niobium
42|Mo|molybdenum
43|Tc|technetium
44|Ru|ruthenium
45|Rh|rhodium
46|Pd|palladium
47|Ag|silver
48|Cd|cadmium
49|In|indium
50|Sn|tin
51|Sb|antimony
52|Te|tellurium
53|I|iodine
54|Xe|xenon
55|Cs|caesium;cesium
56|Ba|barium
74|W|tungsten
78|Pt|platinum
79|Au|gold
80|Hg|mercury
82|Pb|lead
86|Rn|radon
92|U|uranium
94|Pu|plutonium
"""

_BOOKS = """
Pride and Prejudice|Jane Austen|1813|English
Nineteen Eighty-Four|George Orwell|1949|English
Animal Farm|George Orwell|1945|English
Moby-Dick|Herman Melville|1851|English
War and Peace|Leo Tolstoy|1869|Russian
Anna Karenina|Leo Tolstoy|1878|Russian
Crime and Punishment|Fyodor Dostoevsky|1866|Russian
The Brothers Karamazov|Fyodor Dostoevsky|1880|Russian
Don Quixote|Miguel de Cervantes;Cervantes|1605|Spanish
One Hundred Years of Solitude|Gabriel Garcia Marquez;Gabriel García Márquez|1967|Spanish
Les Miserables|Victor Hugo|1862|French
Madame Bovary|Gustave Flaubert|1857|French
The Stranger|Albert Camus|1942|French
The Little Prince|Antoine de Saint-Exupery;Saint-Exupéry|1943|French
The Great Gatsby|F. Scott Fitzgerald|1925|English
To Kill a Mockingbird|Harper Lee|1960|English
The Catcher in the Rye|J. D. Salinger;Salinger|1951|English
Brave New World|Aldous Huxley|1932|English
Frankenstein|Mary Shelley|1818|English
Dracula|Bram Stoker|1897|English
Jane Eyre|Charlotte Bronte;Charlotte Brontë|1847|English
Wuthering Heights|Emily Bronte;Emily Brontë|1847|English
Great Expectations|Charles Dickens|1861|English
A Tale of Two Cities|Charles Dickens|1859|English
Ulysses|James Joyce|1922|English
The Hobbit|J. R. R. Tolkien;Tolkien|1937|English
The Old Man and the Sea|Ernest Hemingway|1952|English
The Grapes of Wrath|John Steinbeck|1939|English
Of Mice and Men|John Steinbeck|1937|English
Lolita|Vladimir Nabokov|1955|English
The Trial|Franz Kafka|1925|German
The Metamorphosis|Franz Kafka|1915|German
The Magic Mountain|Thomas Mann|1924|German
Steppenwolf|Hermann Hesse|1927|German
Siddhartha|Hermann Hesse|1922|German
The Tin Drum|Gunter Grass;Günter Grass|1959|German
All Quiet on the Western Front|Erich Maria Remarque|1929|German
The Name of the Rose|Umberto Eco|1980|Italian
Beloved|Toni Morrison|1987|English
Fahrenheit 451|Ray Bradbury|1953|English
Dune|Frank Herbert|1965|English
Slaughterhouse-Five|Kurt Vonnegut|1969|English
Catch-22|Joseph Heller|1961|English
The Handmaid's Tale|Margaret Atwood|1985|English
Things Fall Apart|Chinua Achebe|1958|English
Norwegian Wood|Haruki Murakami|1987|Japanese
The Three Musketeers|Alexandre Dumas|1844|French
Twenty Thousand Leagues Under the Seas|Jules Verne|1870|French
Around the World in Eighty Days|Jules Verne|1872|French
The Picture of Dorian Gray|Oscar Wilde|1890|English
Alice's Adventures in Wonderland|Lewis Carroll|1865|English
Treasure Island|Robert Louis Stevenson|1883|English
The Alchemist|Paulo Coelho|1988|Portuguese
Blindness|Jose Saramago;José Saramago|1995|Portuguese
Lord of the Flies|William Golding|1954|English
Gulliver's Travels|Jonathan Swift|1726|English
Robinson Crusoe|Daniel Defoe|1719|English
"""

_COMPANIES = """
Apple|Steve Jobs, Steve Wozniak and Ronald Wayne;Steve Jobs;Steve Wozniak|Cupertino|1976
Microsoft|Bill Gates and Paul Allen;Bill Gates;Paul Allen|Redmond|1975
Amazon|Jeff Bezos|Seattle|1994
Google|Larry Page and Sergey Brin;Larry Page;Sergey Brin|Mountain View|1998
Meta|Mark Zuckerberg|Menlo Park|2004
Netflix|Reed Hastings and Marc Randolph;Reed Hastings|Los Gatos|1997
Nike|Bill Bowerman and Phil Knight;Phil Knight|Beaverton|1964
Intel|Robert Noyce and Gordon Moore;Gordon Moore;Robert Noyce|Santa Clara|1968
Nvidia|Jensen Huang, Chris Malachowsky and Curtis Priem;Jensen Huang|Santa Clara|1993
Adobe|John Warnock and Charles Geschke|San Jose|1982
Cisco|Leonard Bosack and Sandy Lerner|San Jose|1984
Dell|Michael Dell|Round Rock|1984
Hewlett-Packard|Bill Hewlett and David Packard|Palo Alto|1939
Starbucks|Jerry Baldwin, Zev Siegl and Gordon Bowker|Seattle|1971
Walmart|Sam Walton|Bentonville|1962
Ford|Henry Ford|Dearborn|1903
General Motors|William C. Durant;William Durant|Detroit|1908
Boeing|William Boeing|Arlington|1916
Toyota|Kiichiro Toyoda|Toyota City|1937
Honda|Soichiro Honda|Tokyo|1948
Sony|Masaru Ibuka and Akio Morita|Tokyo|1946
Samsung|Lee Byung-chul|Seoul|1938
Nintendo|Fusajiro Yamauchi|Kyoto|1889
Lego|Ole Kirk Christiansen|Billund|1932
Siemens|Werner von Siemens|Munich|1847
Nokia|Fredrik Idestam|Espoo|1865
Spotify|Daniel Ek and Martin Lorentzon;Daniel Ek|Stockholm|2006
Airbnb|Brian Chesky, Joe Gebbia and Nathan Blecharczyk;Brian Chesky|San Francisco|2008
Uber|Travis Kalanick and Garrett Camp|San Francisco|2009
Alibaba|Jack Ma|Hangzhou|1999
Tencent|Ma Huateng;Pony Ma|Shenzhen|1998
Huawei|Ren Zhengfei|Shenzhen|1987
Disney|Walt Disney and Roy O. Disney;Walt Disney|Burbank|1923
Harley-Davidson|William S. Harley and Arthur Davidson|Milwaukee|1903
Ferrari|Enzo Ferrari|Maranello|1939
Adidas|Adolf Dassler|Herzogenaurach|1949
Puma|Rudolf Dassler|Herzogenaurach|1948
Rolex|Hans Wilsdorf|Geneva|1905
Nestle|Henri Nestle;Henri Nestlé|Vevey|1866
Inditex|Amancio Ortega|Arteixo|1985
Salesforce|Marc Benioff|San Francisco|1999
Zoom|Eric Yuan|San Jose|2011
Dropbox|Drew Houston and Arash Ferdowsi;Drew Houston|San Francisco|2007
eBay|Pierre Omidyar|San Jose|1995
"""

_ANIMALS = """
lion|Panthera leo|mammal|carnivore
tiger|Panthera tigris|mammal|carnivore
leopard|Panthera pardus|mammal|carnivore
jaguar|Panthera onca|mammal|carnivore
snow leopard|Panthera uncia|mammal|carnivore
cheetah|Acinonyx jubatus|mammal|carnivore
gray wolf|Canis lupus|mammal|carnivore
red fox|Vulpes vulpes|mammal|omnivore
brown bear|Ursus arctos|mammal|omnivore
polar bear|Ursus maritimus|mammal|carnivore
giant panda|Ailuropoda melanoleuca|mammal|herbivore
red panda|Ailurus fulgens|mammal|herbivore
African elephant|Loxodonta africana|mammal|herbivore
giraffe|Giraffa camelopardalis|mammal|herbivore
hippopotamus|Hippopotamus amphibius|mammal|herbivore
plains zebra|Equus quagga|mammal|herbivore
chimpanzee|Pan troglodytes|mammal|omnivore
western gorilla|Gorilla gorilla|mammal|herbivore
koala|Phascolarctos cinereus|mammal|herbivore
red kangaroo|Osphranter rufus;Macropus rufus|mammal|herbivore
platypus|Ornithorhynchus anatinus|mammal|carnivore
blue whale|Balaenoptera musculus|mammal|carnivore
bottlenose dolphin|Tursiops truncatus|mammal|carnivore
orca|Orcinus orca|mammal|carnivore
raccoon|Procyon lotor|mammal|omnivore
house cat|Felis catus|mammal|carnivore
domestic dog|Canis familiaris;Canis lupus familiaris|mammal|omnivore
horse|Equus caballus;Equus ferus caballus|mammal|herbivore
cow|Bos taurus|mammal|herbivore
bald eagle|Haliaeetus leucocephalus|bird|carnivore
emperor penguin|Aptenodytes forsteri|bird|carnivore
ostrich|Struthio camelus|bird|omnivore
barn owl|Tyto alba|bird|carnivore
snowy owl|Bubo scandiacus|bird|carnivore
peregrine falcon|Falco peregrinus|bird|carnivore
great white shark|Carcharodon carcharias|fish|carnivore
Atlantic salmon|Salmo salar|fish|carnivore
Komodo dragon|Varanus komodoensis|reptile|carnivore
green sea turtle|Chelonia mydas|reptile|herbivore
Nile crocodile|Crocodylus niloticus|reptile|carnivore
king cobra|Ophiophagus hannah|reptile|carnivore
American alligator|Alligator mississippiensis|reptile|carnivore
Gila monster|Heloderma suspectum|reptile|carnivore
axolotl|Ambystoma mexicanum|amphibian|carnivore
cane toad|Rhinella marina|amphibian|carnivore
fire salamander|Salamandra salamandra|amphibian|carnivore
western honey bee|Apis mellifera|insect|herbivore
monarch butterfly|Danaus plexippus|insect|herbivore
"""

_CITIES = """
Paris|France|CDG|the Eiffel Tower
London|the United Kingdom;UK|LHR|Big Ben
New York City|the United States;USA|JFK|the Statue of Liberty
Tokyo|Japan|HND;NRT|Tokyo Tower
Rome|Italy|FCO|the Colosseum
Berlin|Germany|BER|the Brandenburg Gate
Madrid|Spain|MAD|the Royal Palace of Madrid
Barcelona|Spain|BCN|the Sagrada Familia;Sagrada Família
Amsterdam|the Netherlands|AMS|the Rijksmuseum
Moscow|Russia|SVO|Red Square
Istanbul|Turkey|IST|Hagia Sophia
Dubai|the United Arab Emirates;UAE|DXB|the Burj Khalifa
Singapore|Singapore|SIN|Marina Bay Sands
Sydney|Australia|SYD|the Sydney Opera House
Rio de Janeiro|Brazil|GIG|Christ the Redeemer
Cairo|Egypt|CAI|the Cairo Citadel
Athens|Greece|ATH|the Acropolis;Parthenon
Beijing|China|PEK|the Forbidden City
Shanghai|China|PVG|the Bund
Mumbai|India|BOM|the Gateway of India
New Delhi|India|DEL|India Gate
Agra|India|AGR|the Taj Mahal
Bangkok|Thailand|BKK|the Grand Palace
Seoul|South Korea|ICN|Gyeongbokgung Palace
San Francisco|the United States;USA|SFO|the Golden Gate Bridge
Los Angeles|the United States;USA|LAX|the Hollywood Sign
Chicago|the United States;USA|ORD|the Willis Tower
Seattle|the United States;USA|SEA|the Space Needle
Las Vegas|the United States;USA|LAS|the Las Vegas Strip
Boston|the United States;USA|BOS|the Freedom Trail
Honolulu|the United States;USA|HNL|Diamond Head
Toronto|Canada|YYZ|the CN Tower
Vancouver|Canada|YVR|Stanley Park
Montreal|Canada|YUL|the Notre-Dame Basilica
Mexico City|Mexico|MEX|the Palacio de Bellas Artes
Buenos Aires|Argentina|EZE|the Obelisco
Lisbon|Portugal|LIS|Belem Tower;Belém Tower
Prague|the Czech Republic;Czechia|PRG|the Charles Bridge
Vienna|Austria|VIE|Schonbrunn Palace;Schönbrunn Palace
Budapest|Hungary|BUD|the Hungarian Parliament Building
Copenhagen|Denmark|CPH|the Little Mermaid statue;Little Mermaid
Stockholm|Sweden|ARN|the Vasa Museum
Dublin|Ireland|DUB|Trinity College
Edinburgh|the United Kingdom;UK;Scotland|EDI|Edinburgh Castle
Venice|Italy|VCE|St Mark's Basilica
Florence|Italy|FLR|Florence Cathedral;Duomo
Pisa|Italy|PSA|the Leaning Tower of Pisa
Munich|Germany|MUC|Marienplatz
Brussels|Belgium|BRU|the Atomium
Cape Town|South Africa|CPT|Table Mountain
Kuala Lumpur|Malaysia|KUL|the Petronas Towers
Osaka|Japan|KIX|Osaka Castle
"""

_LANGUAGES = """
Python|Guido van Rossum|1991
Java|James Gosling|1995
C|Dennis Ritchie|1972
C++|Bjarne Stroustrup|1985
JavaScript|Brendan Eich|1995
Ruby|Yukihiro Matsumoto;Matz|1995
Perl|Larry Wall|1987
PHP|Rasmus Lerdorf|1995
Go|Robert Griesemer, Rob Pike and Ken Thompson;Rob Pike;Ken Thompson|2009
Rust|Graydon Hoare|2010
Swift|Chris Lattner|2014
Kotlin|Andrey Breslav;JetBrains|2011
C#|Anders Hejlsberg|2000
TypeScript|Anders Hejlsberg|2012
Scala|Martin Odersky|2004
Lisp|John McCarthy|1958
Fortran|John Backus|1957
COBOL|Grace Hopper|1959
Pascal|Niklaus Wirth|1970
Erlang|Joe Armstrong|1986
Elixir|Jose Valim;José Valim|2012
Clojure|Rich Hickey|2007
Lua|Roberto Ierusalimschy|1993
MATLAB|Cleve Moler|1984
R|Ross Ihaka and Robert Gentleman|1993
Julia|Jeff Bezanson, Stefan Karpinski, Viral Shah and Alan Edelman|2012
Dart|Lars Bak and Kasper Lund|2011
Smalltalk|Alan Kay|1972
Objective-C|Brad Cox and Tom Love|1984
Tcl|John Ousterhout|1988
BASIC|John Kemeny and Thomas Kurtz|1964
Prolog|Alain Colmerauer|1972
OCaml|Xavier Leroy|1996
Zig|Andrew Kelley|2016
Elm|Evan Czaplicki|2012
"""

_INVENTIONS = """
telephone|Alexander Graham Bell|1876
phonograph|Thomas Edison|1877
incandescent light bulb|Thomas Edison|1879
World Wide Web|Tim Berners-Lee|1989
printing press|Johannes Gutenberg|1440
airplane|the Wright brothers;Wright brothers;Orville and Wilbur Wright|1903
radio|Guglielmo Marconi|1895
electric telegraph|Samuel Morse|1837
mechanical television|John Logie Baird|1926
revolver|Samuel Colt|1836
cotton gin|Eli Whitney|1793
sewing machine|Elias Howe|1846
polio vaccine|Jonas Salk|1955
ballpoint pen|Laszlo Biro;László Bíró|1938
jet engine|Frank Whittle|1930
safety razor|King C. Gillette|1901
lightning rod|Benjamin Franklin|1752
mercury barometer|Evangelista Torricelli|1643
mercury thermometer|Daniel Gabriel Fahrenheit;Fahrenheit|1714
diesel engine|Rudolf Diesel|1893
Braille system|Louis Braille|1824
dishwasher|Josephine Cochrane|1886
"""

# ---------------------------------------------------------------------------
# Phrasings: six slots per attribute (0-1 plain frames, 2-5 idiomatic); the
# domain's ``contexts[i]`` is wrapped around slot i of every attribute.
# ---------------------------------------------------------------------------

DOMAINS: dict[str, Domain] = {
    "country": Domain(
        contexts=(
            "",
            "Quick geography question before my quiz team meets tonight, since we always lose points on this round.",
            "I'm filling in a giant crossword about the nations of the world and one clue has me completely stuck.",
            "For my social studies homework, which is due first thing tomorrow morning, I need to answer this:",
            "My friend and I have been arguing about this all evening over dinner and neither of us will back down.",
            "I'm planning a long backpacking trip abroad next year and reading up on every stop, so I was wondering:",
        ),
        attributes=("capital", "currency", "continent", "official_language"),
        templates={
            "capital": (
                "What is the capital of {e}?",
                "Tell me the capital of {e}.",
                "Which city do the leaders of {e} govern from?",
                "Where is {e}'s seat of government?",
                "Which city is the seat of government in {e}?",
                "Where is the national government of {e} based?",
            ),
            "currency": (
                "What is the currency of {e}?",
                "Tell me the currency of {e}.",
                "Which notes and coins do shops in {e} accept?",
                "What money do people pay with in {e}?",
                "Which legal tender circulates in {e}?",
                "If I travel to {e}, what cash should I bring?",
            ),
            "continent": (
                "What is the continent of {e}?",
                "Tell me the continent of {e}.",
                "Which continent would I fly to in order to visit {e}?",
                "In which part of the world would I find {e}?",
                "On what landmass does {e} lie?",
                "Where on the globe is {e} situated?",
            ),
            "official_language": (
                "What is the official language of {e}?",
                "Tell me the official language of {e}.",
                "Which language do schools in {e} officially teach in?",
                "What language are government documents in {e} written in?",
                "Which tongue is used officially in {e}?",
                "If I move to {e}, which language should I learn to deal with officials?",
            ),
        },
        responses={
            "capital": "The capital of {e} is {v}.",
            "currency": "The currency of {e} is the {v}.",
            "continent": "{e} is located in {v}.",
            "official_language": "The official language of {e} is {v}.",
        },
    ),
    "element": Domain(
        contexts=(
            "",
            "Quick chemistry question before my study group meets tonight, since we keep getting these wrong.",
            "I'm revising for tomorrow's chemistry exam and this is the one fact that will not stick in my head.",
            "For the lab report I have to hand in on Friday, our teacher wants this detail in the introduction:",
            "My kid asked me this while we were looking at a big poster of the periodic table, and I had no idea.",
            "I'm writing a stack of flashcards about the elements for my students and need one more fact to check:",
        ),
        attributes=("symbol", "atomic_number", "period"),
        templates={
            "symbol": (
                "What is the chemical symbol of {e}?",
                "Tell me the chemical symbol of {e}.",
                "Which letters represent {e} in chemical formulas?",
                "How is {e} abbreviated on the periodic table?",
                "Which one- or two-letter code stands for {e}?",
                "If I write {e} in a chemical equation, what do I put down?",
            ),
            "atomic_number": (
                "What is the atomic number of {e}?",
                "Tell me the atomic number of {e}.",
                "How many protons are in the nucleus of {e}?",
                "How many protons does an atom of {e} have?",
                "Which position does {e} take when elements are ordered by proton count?",
                "If I count the protons in one {e} atom, what number do I get?",
            ),
            "period": (
                "What is the period of {e}?",
                "Tell me the period of {e}.",
                "Which row of the periodic table holds {e}?",
                "How far down the periodic table is {e}, counting rows?",
                "Which horizontal row of the table contains {e}?",
                "If I read the periodic table line by line, on which line do I find {e}?",
            ),
        },
        responses={
            "symbol": "The chemical symbol of {e} is {v}.",
            "atomic_number": "The atomic number of {e} is {v}.",
            "period": "{e} is in period {v} of the periodic table.",
        },
    ),
    "book": Domain(
        contexts=(
            "",
            "Quick literature question before my book club meets tonight, since I volunteered to lead the discussion.",
            "I'm putting together a reading list of classics for the summer and want my notes to be accurate.",
            "For the English essay I have to submit at the end of this week, I need to get this detail right:",
            "My grandmother and I were talking about the novels she loved as a girl and this came up last night.",
            "I found a battered old copy in a second-hand bookshop downtown this morning, and I was wondering:",
        ),
        attributes=("author", "publication_year", "original_language"),
        templates={
            "author": (
                "Who is the author of {e}?",
                "Tell me the author of {e}.",
                "Whose name is on the cover of {e}?",
                "Who wrote {e}?",
                "Which novelist penned {e}?",
                "If I want more books by the person behind {e}, whose work should I look for?",
            ),
            "publication_year": (
                "What is the publication year of {e}?",
                "Tell me the publication year of {e}.",
                "Since what year has {e} been available in bookshops?",
                "When did {e} first come out in print?",
                "In what year did readers first get their hands on {e}?",
                "How old is {e}, that is, in what year was it released?",
            ),
            "original_language": (
                "What is the original language of {e}?",
                "Tell me the original language of {e}.",
                "In which language was the first edition of {e} printed?",
                "In what language did the author compose {e}?",
                "Which language was {e} originally written in?",
                "If I want to read {e} untranslated, which language do I need?",
            ),
        },
        responses={
            "author": "{e} was written by {v}.",
            "publication_year": "{e} was first published in {v}.",
            "original_language": "{e} was originally written in {v}.",
        },
    ),
    "company": Domain(
        contexts=(
            "",
            "Quick business question before my investment club meets tonight, since I'm presenting this firm.",
            "I'm preparing for a job interview next week and reading up on the big firms in the industry.",
            "For the economics presentation I'm giving to my class on Monday, I need this fact on a slide:",
            "My coworkers and I were debating corporate history over lunch today and nobody could settle it.",
            "I'm writing a long blog post about famous brands and how they grew, and I need to double-check:",
        ),
        attributes=("founder", "headquarters", "founding_year"),
        templates={
            "founder": (
                "Who is the founder of {e}?",
                "Tell me the founder of {e}.",
                "Whose idea was the company {e} in the beginning?",
                "Who started {e}?",
                "Which entrepreneur set up {e} in the first place?",
                "If I want to read about the people behind the birth of {e}, who should I look up?",
            ),
            "headquarters": (
                "Where is the headquarters of {e}?",
                "Tell me the headquarters of {e}.",
                "Which city does {e} run its business from?",
                "In which city is {e} based?",
                "Where would I find the main corporate offices of {e}?",
                "If I want to visit the head office of {e}, which city do I go to?",
            ),
            "founding_year": (
                "What is the founding year of {e}?",
                "Tell me the founding year of {e}.",
                "Since what year has the company {e} existed?",
                "When was {e} established?",
                "In what year did {e} open for business?",
                "How long ago did {e} start out, in which year?",
            ),
        },
        responses={
            "founder": "{e} was founded by {v}.",
            "headquarters": "{e} is headquartered in {v}.",
            "founding_year": "{e} was founded in {v}.",
        },
    ),
    "animal": Domain(
        contexts=(
            "",
            "Quick biology question before my nature club meets tonight, since I'm giving a short talk.",
            "I'm making a big wildlife poster for my son's school project and want every label to be right.",
            "For the zoology notes I have to hand in at the end of this term, I need to fill in this detail:",
            "My daughter asked me this at the zoo today while we stood by the enclosure, and I didn't know.",
            "I'm watching a nature documentary on the couch right now and the narrator skipped over this, so:",
        ),
        attributes=("scientific_name", "animal_class", "diet"),
        templates={
            "scientific_name": (
                "What is the scientific name of the {e}?",
                "Tell me the scientific name of the {e}.",
                "Which Latin binomial do zoologists use for the {e}?",
                "How do biologists refer to the {e} in taxonomy?",
                "What genus and species is the {e}?",
                "If I look up the {e} in a taxonomy database, which two-word name do I find?",
            ),
            "animal_class": (
                "What is the animal class of the {e}?",
                "Tell me the animal class of the {e}.",
                "Which class of the animal kingdom does the {e} belong to?",
                "Is the {e} a mammal, bird, reptile, fish, amphibian or insect?",
                "Which broad group of creatures includes the {e}?",
                "If I sort animals into mammals, birds, reptiles and so on, where does the {e} go?",
            ),
            "diet": (
                "What is the diet of the {e}?",
                "Tell me the diet of the {e}.",
                "Which kind of food does the {e} live on?",
                "Is the {e} a carnivore, herbivore or omnivore?",
                "What does the {e} eat?",
                "If I had to feed the {e}, would it want meat, plants or both?",
            ),
        },
        responses={
            "scientific_name": "The scientific name of the {e} is {v}.",
            "animal_class": "The {e} is a {v}.",
            "diet": "The {e} is a {v}.",
        },
    ),
    "city": Domain(
        contexts=(
            "",
            "Quick travel question before I book anything tonight, since I'm comparing a few destinations.",
            "I'm planning a long weekend getaway for our anniversary and reading up on places to visit.",
            "For the travel itinerary I'm putting together for my parents' holiday, I need this detail:",
            "My partner and I were looking through old holiday photos last night and this question came up.",
            "I'm writing a travel guide about famous cities around the world for my blog, and I need to check:",
        ),
        attributes=("country", "airport_code", "landmark"),
        templates={
            "country": (
                "What is the country of {e}?",
                "Tell me the country {e} is in.",
                "Which nation does {e} belong to?",
                "What nation would I be visiting if I went to {e}?",
                "{e} is a city in which country?",
                "If I mail a letter to {e}, which country do I write on the envelope?",
            ),
            "airport_code": (
                "What is the main airport code of {e}?",
                "Tell me the main airport code of {e}.",
                "Which IATA code does the main airport of {e} use?",
                "What three letters should I type to book a flight into {e}?",
                "Which code appears on baggage tags for flights to {e}?",
                "Which airport abbreviation do travel sites show for {e}?",
            ),
            "landmark": (
                "What is the most famous landmark of {e}?",
                "Tell me the most famous landmark of {e}.",
                "What sight do tourists most associate with {e}?",
                "Which monument is the symbol of {e}?",
                "Which attraction appears on nearly every postcard from {e}?",
                "If I only have one afternoon in {e}, what famous sight must I see?",
            ),
        },
        responses={
            "country": "{e} is in {v}.",
            "airport_code": "The main airport code of {e} is {v}.",
            "landmark": "The most famous landmark of {e} is {v}.",
        },
    ),
    "programming_language": Domain(
        contexts=(
            "",
            "Quick programming question before my coding meetup tonight, since I'm giving a lightning talk.",
            "I'm preparing slides on the history of software for a conference talk next month.",
            "For the computer science assignment I have to submit on Friday, I need to cite this fact:",
            "My colleagues and I were debating old programming languages over lunch and nobody agreed.",
            "I'm writing a long blog post about how coding has evolved over the decades, and I need to check:",
        ),
        attributes=("creator", "release_year"),
        templates={
            "creator": (
                "Who is the creator of {e}?",
                "Tell me the creator of the {e} programming language.",
                "Whose brainchild was the {e} language?",
                "Who invented the {e} language?",
                "Which computer scientist came up with {e}?",
                "If I want to thank the person who designed {e}, who would that be?",
            ),
            "release_year": (
                "What is the release year of {e}?",
                "Tell me the release year of the {e} programming language.",
                "Since what year have programmers been able to use {e}?",
                "When did the {e} language first come out?",
                "In which year did {e} first appear?",
                "How old is {e}, in other words in which year was it born?",
            ),
        },
        responses={
            "creator": "{e} was created by {v}.",
            "release_year": "{e} first appeared in {v}.",
        },
    ),
    "invention": Domain(
        contexts=(
            "",
            "Quick history question before my pub quiz team meets tonight, since we always miss these.",
            "I'm preparing a quiz about great inventions for the office party and want the answers to be right.",
            "For the history of technology essay I have to hand in next week, I need to get this detail right:",
            "My son asked me this while we were walking around a science museum today, and I wasn't sure.",
            "I'm writing a magazine article about world-changing ideas and the people behind them, so I need to check:",
        ),
        attributes=("inventor", "invention_year"),
        templates={
            "inventor": (
                "Who is the inventor of the {e}?",
                "Tell me the inventor of the {e}.",
                "Whose invention was the {e}?",
                "Who came up with the {e}?",
                "Whom do we thank for creating the {e}?",
                "If I write a report on the origins of the {e}, which person should I credit?",
            ),
            "invention_year": (
                "What is the invention year of the {e}?",
                "Tell me the invention year of the {e}.",
                "Since what year has the {e} existed?",
                "When was the {e} first created?",
                "In what year did the {e} come into existence?",
                "How long ago was the {e} invented, in which year exactly?",
            ),
        },
        responses={
            "inventor": "The {e} was invented by {v}.",
            "invention_year": "The {e} was invented in {v}.",
        },
    ),
}


def _period(z: int) -> int:
    for period, last in enumerate((2, 10, 18, 36, 54, 86, 118), start=1):
        if z <= last:
            return period
    raise ValueError(z)


def _parse(raw: str, n_fields: int) -> list[list[str]]:
    rows = [line.split("|") for line in raw.strip().splitlines()]
    for row in rows:
        if len(row) != n_fields:
            raise ValueError(f"bad fact row: {row}")
    return rows


def _build_facts() -> dict[str, dict[str, dict[str, tuple[str, ...]]]]:
    def aliases(field: str) -> tuple[str, ...]:
        out: list[str] = []
        for alias in (a.strip() for a in field.split(";")):
            out.append(alias)
            if alias.startswith("the "):  # "the Bund" is also accepted as "Bund"
                out.append(alias[4:])
        return tuple(dict.fromkeys(a for a in out if a))

    tables = {
        "country": _COUNTRIES,
        "book": _BOOKS,
        "company": _COMPANIES,
        "animal": _ANIMALS,
        "city": _CITIES,
        "programming_language": _LANGUAGES,
        "invention": _INVENTIONS,
    }
    facts: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {}
    for domain, spec in DOMAINS.items():
        if domain == "element":
            facts[domain] = {
                name.split(";")[0]: {
                    "symbol": (sym,),
                    "atomic_number": (z,),
                    "period": (str(_period(int(z))),),
                }
                for z, sym, name in _parse(_ELEMENTS, 3)
            }
            continue
        rows = _parse(tables[domain], 1 + len(spec.attributes))
        facts[domain] = {
            row[0]: {a: aliases(v) for a, v in zip(spec.attributes, row[1:])} for row in rows
        }
    return facts


#: ``FACTS[domain][entity][attribute]`` -> tuple of accepted answers; the first
#: one is canonical (used in responses), the rest are aliases.  Entity names
#: are unique across all domains.
FACTS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = _build_facts()

_ENTITY_RANK = {(d, e): k for d, ents in FACTS.items() for k, e in enumerate(ents)}
_NEAR_ENTITIES = 4  # entity-swap negatives use one of the 4 nearest table neighbours

_MAX_MISSES = 2000  # consecutive failed draws before a pair kind is given up

_PROMPT_COLUMNS = ["prompt", "answers", "group", "domain", "entity", "attribute", "template", "context",
                   "split"]
_PAIR_COLUMNS = ["prompt_a", "prompt_b", "label", "group_a", "group_b", "answers_a", "answers_b"]
_STREAM_COLUMNS = ["prompt", "group", "answers", "response"]


def _cap(text: str) -> str:
    """Upper-case the first letter, leaving names like "eBay" alone."""
    if len(text) > 1 and text[1].isupper():
        return text
    return text[:1].upper() + text[1:]


def _phrase(spec: Domain, template: str, slot: int, entity: str) -> str:
    """Template ``template`` for ``entity`` wrapped in the domain's context number ``slot``."""
    question = _cap(template.format(e=entity))
    context = spec.contexts[slot] if 0 <= slot < len(spec.contexts) else ""
    if not context:
        return question
    if "{q}" in context:
        return context.format(q=question)
    if context.endswith(":") and not template.startswith("{e}"):
        question = question[:1].lower() + question[1:]
    return f"{context} {question}"


def _group_id(domain: str, entity: str, attribute: str) -> str:
    return f"{domain}:{entity}:{attribute}"


def _add_typo(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) > 3 and w.isalpha()]
    if not candidates:
        return text
    i = int(rng.choice(candidates))
    w = words[i]
    j = int(rng.integers(0, len(w) - 1))
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def _noisy(text: str, rng: np.random.Generator, noise: bool, typo_rate: float) -> str:
    """Light, seeded surface noise that never changes the meaning."""
    draws = rng.random(4)
    if noise:
        if draws[0] < 0.1 and text.endswith("."):
            text = text[:-1] + ", please."
        if draws[1] < 0.1:
            text = text.rstrip("?.")
        if draws[2] < 0.1:
            text = text.lower()
    if draws[3] < typo_rate:
        text = _add_typo(text, rng)
    return text


#: Phrasings of the train split: template slot i wrapped in context i (context 0 is none).
TRAIN_PHRASINGS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2))
#: Phrasings of the held-out (val and test) splits: the three idiomatic templates and their
#: contexts that the train split never uses (slot i in context i).
HELDOUT_PHRASINGS: tuple[tuple[int, int], ...] = ((3, 3), (4, 4), (5, 5))
#: Without holdout (``holdout_phrasings=False``) every split uses all six diagonal slots.
ALL_PHRASINGS: tuple[tuple[int, int], ...] = tuple((t, t) for t in range(6))

SPLITS = ("train", "val", "test")


def phrasings_of(split: str, holdout_phrasings: bool = True) -> tuple[tuple[int, int], ...]:
    """(template slot, context slot) pairs a split's prompts are written with."""
    if not holdout_phrasings:
        return ALL_PHRASINGS
    return TRAIN_PHRASINGS if split == "train" else HELDOUT_PHRASINGS


def generate_prompts(
    seed: int = 0,
    phrasings_per_group: int | None = None,
    *,
    noise: bool = True,
    typo_rate: float = 0.0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    holdout_phrasings: bool = True,
) -> pd.DataFrame:
    """Expand the fact table into one row per (group, phrasing).

    Columns: ``prompt`` (str), ``answers`` (list[str], canonical answer first),
    ``group`` ("domain:entity:attribute"), ``domain``, ``entity``,
    ``attribute``, ``template`` (int index into
    ``DOMAINS[domain].templates[attribute]``), ``context`` (int index into
    ``DOMAINS[domain].contexts``; 0 is no context) and ``split``
    ("train"/"val"/"test").

    Entities are split per domain: a seeded ``test_fraction`` (~20%) of each
    domain's entities go to "test" and ``val_fraction`` (~10%) to "val", so no
    entity -- hence no group -- appears in two splits.  With
    ``holdout_phrasings`` (the default) the splits are also written differently:
    train prompts use template slots 0-3, each in its own context
    (:data:`TRAIN_PHRASINGS`, 4 per group); val and test prompts use slots 4-5,
    plain and in contexts 4-5 (:data:`HELDOUT_PHRASINGS`, 6 per group), which
    training never sees.  So a fine-tuned encoder is scored on wordings and
    preambles it was not fitted to.  ``holdout_phrasings=False`` writes every
    split with all six slots (template i in context i).
    ``phrasings_per_group=None`` keeps every phrasing of the split; an int
    keeps a seeded sample of that many per group.  ``noise`` adds light
    variation (lowercase, ", please", dropped final punctuation, each ~10%);
    ``typo_rate`` (0 by default) swaps two adjacent letters in that fraction
    of prompts.
    """
    # Independent streams, so that noise settings never move the split and the
    # phrasing sample.
    split_rng, pick_rng, noise_rng = (np.random.default_rng([seed, k]) for k in range(3))
    rows = []
    for domain, spec in DOMAINS.items():
        entities = list(FACTS[domain])
        n_test = max(1, int(round(test_fraction * len(entities))))
        n_val = int(round(val_fraction * len(entities)))
        order = split_rng.permutation(len(entities))
        split_of = {entities[i]: "test" for i in order[:n_test]}
        split_of.update({entities[i]: "val" for i in order[n_test:n_test + n_val]})
        for entity in entities:
            split = split_of.get(entity, "train")
            phrasings = phrasings_of(split, holdout_phrasings)
            for attribute in spec.attributes:
                templates = spec.templates[attribute]
                chosen = [(t, c) for t, c in phrasings if t < len(templates)]
                if phrasings_per_group is not None:
                    k = min(max(1, int(phrasings_per_group)), len(chosen))
                    chosen = [chosen[int(i)] for i in sorted(pick_rng.choice(len(chosen), size=k, replace=False))]
                answers = list(FACTS[domain][entity][attribute])
                group = _group_id(domain, entity, attribute)
                for t, c in chosen:
                    text = _noisy(_phrase(spec, templates[t], c, entity), noise_rng, noise, typo_rate)
                    rows.append((text, list(answers), group, domain, entity, attribute, t, c, split))
    return pd.DataFrame(rows, columns=_PROMPT_COLUMNS)


def _pick(rng: np.random.Generator, items) -> int:
    return int(items[int(rng.integers(len(items)))])


def generate_pairs(
    prompts: pd.DataFrame,
    n_pairs: int,
    seed: int = 0,
    hard_fraction: float = 0.7,
) -> pd.DataFrame:
    """Sample labelled prompt pairs from ``prompts`` (call it once per split).

    Columns: ``prompt_a``, ``prompt_b``, ``label`` (1.0 iff same group, else
    0.0), ``group_a``, ``group_b``, ``answers_a``, ``answers_b``; ``n_pairs``
    rows unless the frame is too small to supply that many distinct pairs.

    Half the pairs are positives (two different phrasings of one group).  Of the
    negatives, ``hard_fraction`` are hard, split evenly between *entity swaps*
    (same domain, attribute, template and context, another entity: "capital of
    France" vs "capital of Spain") and *attribute swaps* (same entity, template
    slot and context, another attribute: "capital of France" vs "currency of
    France").  Entity swaps prefer a neighbouring entity in the fact table (a
    related one).  The remaining negatives are random pairs of different
    groups, half drawn from the whole frame and half from the anchor's domain
    and context (the same preamble).  No prompt is paired with itself and no
    unordered pair (by text) occurs twice.  Needs the
    ``domain``/``entity``/``attribute`` columns of :func:`generate_prompts`
    (``template`` and ``context`` optional).
    """
    rng = np.random.default_rng(seed)
    df = prompts.reset_index(drop=True)
    n = len(df)
    if n < 2 or n_pairs <= 0:
        return pd.DataFrame(columns=_PAIR_COLUMNS)
    groups = df["group"].to_numpy()
    templates = df["template"].to_numpy() if "template" in df else np.zeros(n, dtype=int)
    # the preamble a prompt is wrapped in (older frames: one context per template slot)
    contexts = df["context"].to_numpy() if "context" in df else templates

    texts = df["prompt"].to_numpy()
    domain, entity, attribute = (df[c].to_numpy() for c in ("domain", "entity", "attribute"))

    by_group: dict = {}
    by_slot: dict = {}  # (domain, attribute, template, context) -> rows
    by_da: dict = {}  # (domain, attribute) -> rows
    by_entity: dict = {}  # (domain, entity) -> rows
    by_dslot: dict = {}  # (domain, context) -> rows
    for i, (d, e, a, t, c) in enumerate(zip(domain, entity, attribute, templates, contexts)):
        by_group.setdefault(groups[i], []).append(i)
        by_slot.setdefault((d, a, t, c), []).append(i)
        by_da.setdefault((d, a), []).append(i)
        by_entity.setdefault((d, e), []).append(i)
        by_dslot.setdefault((d, c), []).append(i)
    multi = [rows for rows in by_group.values() if len(rows) > 1]

    def positive():
        rows = multi[int(rng.integers(len(multi)))]
        i, j = rng.choice(len(rows), size=2, replace=False)
        return rows[int(i)], rows[int(j)]

    def entity_swap():
        i = int(rng.integers(n))
        same = [j for j in by_slot[(domain[i], attribute[i], templates[i], contexts[i])]
                if entity[j] != entity[i]]
        if not same:  # sampled phrasings: fall back to any template of the attribute
            same = [j for j in by_da[(domain[i], attribute[i])] if entity[j] != entity[i]]
        if not same:
            return None
        # Prefer a related entity: the tables list neighbours together
        # (countries by continent, elements by number, books by author, ...).
        here = _ENTITY_RANK.get((domain[i], entity[i]), 0)
        dist = np.array([abs(_ENTITY_RANK.get((domain[j], entity[j]), 0) - here) for j in same])
        near = [same[k] for k in np.argsort(dist, kind="stable")[:_NEAR_ENTITIES]]
        return i, _pick(rng, near)

    def attribute_swap():
        i = int(rng.integers(n))
        others = [j for j in by_entity[(domain[i], entity[i])] if attribute[j] != attribute[i]]
        same_slot = [j for j in others if templates[j] == templates[i] and contexts[j] == contexts[i]]
        cands = same_slot or others
        return (i, _pick(rng, cands)) if cands else None

    def random_negative():
        # Half uniform over the frame, half within the anchor's domain and
        # phrasing slot (so sharing its preamble, like real boilerplate).
        i = int(rng.integers(n))
        if rng.random() < 0.5:
            j = _pick(rng, by_dslot[(domain[i], contexts[i])])
        else:
            j = int(rng.integers(n))
        return (i, j) if groups[i] != groups[j] else None

    n_pos = n_pairs // 2 if multi else 0
    n_neg = n_pairs - n_pos
    n_hard = int(round(hard_fraction * n_neg))
    n_ent = (n_hard + 1) // 2
    plan = [(positive, n_pos), (entity_swap, n_ent), (attribute_swap, n_hard - n_ent)]
    plan.append((random_negative, n_pairs - sum(k for _, k in plan)))

    seen: set[tuple[str, str]] = set()
    out: list[tuple[int, int]] = []
    shortfall = 0
    for make, quota in plan:
        quota += shortfall  # a kind that cannot be filled hands over to the next
        got, misses = 0, 0
        while got < quota and misses < _MAX_MISSES:  # misses: pool exhausted
            pair = make()
            key = None if pair is None else tuple(sorted((texts[pair[0]], texts[pair[1]])))
            if key is None or key[0] == key[1] or key in seen:
                misses += 1
                continue
            misses = 0
            seen.add(key)
            out.append(pair if rng.random() < 0.5 else (pair[1], pair[0]))
            got += 1
        shortfall = quota - got

    order = rng.permutation(len(out))
    a = np.array([out[k][0] for k in order], dtype=int)
    b = np.array([out[k][1] for k in order], dtype=int)
    return pd.DataFrame(
        {
            "prompt_a": texts[a] if len(a) else [],
            "prompt_b": texts[b] if len(b) else [],
            "label": (groups[a] == groups[b]).astype(float) if len(a) else [],
            "group_a": groups[a] if len(a) else [],
            "group_b": groups[b] if len(b) else [],
            "answers_a": [list(df.at[int(i), "answers"]) for i in a],
            "answers_b": [list(df.at[int(i), "answers"]) for i in b],
        },
        columns=_PAIR_COLUMNS,
    )


def _response(domain: str, entity: str, attribute: str, answer: str) -> str:
    return _cap(DOMAINS[domain].responses[attribute].format(e=entity, v=answer))


def generate_stream(
    prompts: pd.DataFrame,
    n_arrivals: int,
    seed: int = 0,
    zipf_s: float = 1.1,
) -> pd.DataFrame:
    """Simulate ``n_arrivals`` cache lookups drawn from ``prompts``.

    Columns (one row per arrival, in arrival order): ``prompt``, ``group``,
    ``answers`` (list[str]) and ``response`` (an answer sentence such as "The
    capital of France is Paris.").  Group popularity is Zipf: the groups are
    shuffled with ``seed`` and the group of rank r (1-based) is drawn with
    probability proportional to r**-zipf_s; the phrasing inside a group is
    uniform over that group's rows.
    """
    rng = np.random.default_rng(seed)
    df = prompts.reset_index(drop=True)
    if n_arrivals <= 0 or df.empty:
        return pd.DataFrame(columns=_STREAM_COLUMNS)
    rows_by_group: dict = {}
    for i, g in enumerate(df["group"]):
        rows_by_group.setdefault(g, []).append(i)
    names = sorted(rows_by_group)
    ranked = [names[i] for i in rng.permutation(len(names))]
    weights = np.arange(1, len(ranked) + 1, dtype=float) ** -float(zipf_s)
    drawn = rng.choice(len(ranked), size=int(n_arrivals), p=weights / weights.sum())
    picks = [_pick(rng, rows_by_group[ranked[k]]) for k in drawn]

    responses = {}
    for g in ranked:
        row = df.iloc[rows_by_group[g][0]]
        responses[g] = _response(row["domain"], row["entity"], row["attribute"], row["answers"][0])
    sel = df.iloc[picks]
    return pd.DataFrame(
        {
            "prompt": sel["prompt"].to_numpy(),
            "group": sel["group"].to_numpy(),
            "answers": [list(x) for x in sel["answers"]],
            "response": [responses[g] for g in sel["group"]],
        },
        columns=_STREAM_COLUMNS,
    )


def write_default_dataset(
    out_dir: str | Path,
    seed: int = 0,
    n_train_pairs: int = 4000,
    n_test_pairs: int = 1500,
    n_arrivals: int = 5000,
    n_val_pairs: int = 600,
    n_val_arrivals: int = 2000,
    holdout_phrasings: bool = True,
) -> dict[str, Path]:
    """Write the default dataset as JSONL files under ``out_dir``.

    Files: ``prompts.jsonl`` (all prompts, with ``split``),
    ``pairs_train.jsonl`` / ``pairs_val.jsonl`` / ``pairs_test.jsonl`` (pairs
    drawn within each split), ``stream.jsonl`` (arrivals over the TEST prompts
    only, so an encoder fine-tuned on the train split is evaluated on unseen
    groups and, with ``holdout_phrasings``, unseen phrasings) and
    ``stream_val.jsonl`` (a separate stream over the VAL prompts: choose a
    threshold there, report it on ``stream.jsonl``).  Returns a mapping from
    the file stems ("prompts", "pairs_train", ...) to the paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = generate_prompts(seed=seed, holdout_phrasings=holdout_phrasings)
    train, val, test = (prompts[prompts["split"] == split] for split in SPLITS)
    frames = {
        "prompts": prompts,
        "pairs_train": generate_pairs(train, n_train_pairs, seed=seed),
        "pairs_val": generate_pairs(val, n_val_pairs, seed=seed + 2),
        "pairs_test": generate_pairs(test, n_test_pairs, seed=seed + 1),
        "stream": generate_stream(test, n_arrivals, seed=seed),
        "stream_val": generate_stream(val, n_val_arrivals, seed=seed + 1),
    }
    paths = {}
    for name, frame in frames.items():
        path = out / f"{name}.jsonl"
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
        paths[name] = path
    return paths


def run(cfg) -> dict:
    """``raycache generate``: write the default dataset to ``cfg.out`` (a GenerateConfig)."""
    paths = write_default_dataset(cfg.out, seed=cfg.seed, n_train_pairs=cfg.n_train_pairs,
                                  n_test_pairs=cfg.n_test_pairs, n_arrivals=cfg.n_arrivals,
                                  n_val_pairs=cfg.n_val_pairs, n_val_arrivals=cfg.n_val_arrivals,
                                  holdout_phrasings=cfg.holdout_phrasings)
    return {name: str(path) for name, path in paths.items()}
