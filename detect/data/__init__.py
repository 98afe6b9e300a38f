"""Datasets: PASCAL VOC, COCO, image folders and the synthetic VOC-format generator."""

from detect.data.image import read_image
from detect.data.records import ImageRecord

__all__ = ["ImageRecord", "read_image"]
