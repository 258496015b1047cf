"""What is right for fit_things.py: which of things.py's names are true of each photo it is fitted and measured on.

On Flickr8k a name is right where one of its group's words is in the photo's reference captions (right_flickr); on
the 34 VizWiz photos by blind people, where a sighted person, reading the photo's note (text_truth.json), would call
the thing that (VIZWIZ_RIGHT, judged by hand; right_vizwiz).
"""

import re

import torch

from captioner import things

# The VizWiz photos, judged by hand from text_truth.json's notes: the names a sighted person would accept for the
# thing photographed. A photo of nothing nameable (a shower tray, coins, a red surface) accepts none, so any name
# said for it counts as wrong. Lenient where the name is true of what is there, though not the first word one
# would choose (a can of tomatoes is also food; a game case is a box).
BOTTLE = CAN = ("a bottle or can", "a bottle, can or jar")
BOX = ("a box", "a box or package")
PACKAGE, PAGE = ("a package", "a box or package"), ("a letter or page", "something printed")
VIZWIZ_RIGHT = {
    "Images/VizWiz_val_00000003.jpg": {*BOX, "a package"},  # two eye-drop boxes
    "Images/VizWiz_val_00000008.jpg": {*BOTTLE},  # blurred lotion bottle
    "Images/VizWiz_val_00000009.jpg": {"a sign"},  # bus interior: handrail, wheelchair-seating sign
    "labels_only/Images/VizWiz_train_00000000.jpg": {"a jar", "a bottle, can or jar"},  # spice jar
    "labels_only/Images/VizWiz_train_00000001.jpg": {*CAN},  # Coca-Cola can on a counter, canisters, kettle
    "labels_only/Images/VizWiz_train_00000002.jpg": {*CAN, "food"},  # can of crushed tomatoes
    "labels_only/Images/VizWiz_train_00000003.jpg": {"a web page", "a screen"},  # phone screenshot of a web page
    "labels_only/Images/VizWiz_train_00000004.jpg": {*BOX, "a package"},  # box of a solar garden light
    "labels_only/Images/VizWiz_train_00000005.jpg": {"shoes"},  # two feet in dark shoes
    "labels_only/Images/VizWiz_train_00000006.jpg": {*BOTTLE},  # mouthwash bottle
    "labels_only/Images/VizWiz_train_00000007.jpg": {*PACKAGE},  # monitor cleaning kit in a blister pack
    "labels_only/Images/VizWiz_train_00000008.jpg": {*PACKAGE, "food"},  # bag of orange-slice candies
    "labels_only/Images/VizWiz_train_00000009.jpg": set(),  # empty shower tray
    "labels_only/Images/VizWiz_train_00000010.jpg": {"a phone"},  # hand holding a phone, blank screen
    "labels_only/Images/VizWiz_train_00000011.jpg": {*CAN},  # thumb over a can's label
    "labels_only/Images/VizWiz_train_00000012.jpg": {"a remote control"},  # JVC remote
    "labels_only/Images/VizWiz_train_00000013.jpg": {*CAN},  # Diet Dr Pepper can
    "labels_only/Images/VizWiz_train_00000014.jpg": {*PACKAGE},  # cough-drop bag
    "labels_only/Images/VizWiz_train_00000015.jpg": set(),  # blurred white fabric over a tiled floor
    "labels_only/Images/VizWiz_train_00000016.jpg": set(),  # four coins
    "labels_only/Images/VizWiz_train_00000017.jpg": {"a jar", "a bottle, can or jar"},  # air-freshener jar
    "labels_only/Images/VizWiz_train_00000018.jpg": {"a TV", "a computer screen", "a screen", "a clock"},  # TV
    "labels_only/Images/VizWiz_train_00000019.jpg": set(),  # plain red surface
    "labels_only/Images/VizWiz_train_00000020.jpg": {*BOX, "a book or DVD", "something printed"},  # PS2 game case
    "labels_only/Images/VizWiz_train_00000021.jpg": {*PAGE},  # blurred printed sheet
    "labels_only/Images/VizWiz_train_00000022.jpg": {*CAN, "food"},  # can of kidney beans
    "labels_only/Images/VizWiz_train_00000023.jpg": {*BOX, "a book or DVD", "something printed"},  # DVD cover
    "labels_only/Images/VizWiz_train_00000024.jpg": set(),  # fingers over a dark object
    "labels_only/Images/VizWiz_train_00000025.jpg": {"a dog", "an animal"},  # blurred dog
    "labels_only/Images/VizWiz_train_00000026.jpg": {*BOTTLE},  # lotion bottle
    "labels_only/Images/VizWiz_train_00000027.jpg": set(),  # black
    "labels_only/Images/VizWiz_train_00000028.jpg": {*BOX, "a package"},  # blurred box, cables behind
    "labels_only/Images/VizWiz_train_00000029.jpg": {*PAGE},  # event flyer
    "labels_only/Images/VizWiz_train_00000030.jpg": set(),  # overexposed hand
}


def word_patterns():
    """Each name's words (names() order) as a compiled whole-word pattern."""
    words = [w for w, _ in things.GROUPS.values()] + [w for w, _ in things.BROADER.values()]
    return [re.compile(rf"\b(?:{w})\b") for w in words]


def right_flickr(names, refs):
    """[N, C] bool: whether any of each photo's reference captions uses one of each name's words."""
    patterns = word_patterns()
    return torch.tensor([[any(p.search(r.lower()) for r in refs[n]) for p in patterns] for n in names])


def right_vizwiz(names):
    """[N, C] bool: the names judged right by hand (VIZWIZ_RIGHT) for each VizWiz photo."""
    every = things.names()
    return torch.tensor([[c in VIZWIZ_RIGHT[n] for c in every] for n in names])

