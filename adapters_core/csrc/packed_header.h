// A packed adapter file (`adapters_core/packed_file.py`: safetensors, each dtype's tensors one after another, LoRA
// B stored as Bt and listed under the metadata's `transposed`) read from its mapping in one call that keeps the
// GIL: its JSON header parsed, checked as map_packed's Python path checks it, and every tensor made as a view of
// the mapping. The Python path (json.loads, the checks and the views' arrays a tensor at a time) took ~0.45 ms of
// a loader's GIL for a SmolLM2 adapter on q/v (120 tensors, a 20 KB header), the one thread that reads adapters
// sharing it with the server's event loop; here it is ~0.1 ms. Included once, by sgmv.cpp, whose module binds it.
//
// The parser takes the JSON a packed file's header is (objects, arrays, strings with every escape, integers,
// true / false / null) and refuses, with ValueError, what no packed file holds: fractions and exponents, numbers
// beyond int64, nesting deeper than 8, a key twice in one object, anything after the header but spaces.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_set>
#include <utility>
#include <vector>

namespace packed_header {

namespace py = pybind11;

struct Json {
  enum Kind { kNull, kBool, kInt, kStr, kArr, kObj } kind = kNull;
  int64_t number = 0;                                     // kInt (and kBool: 0 / 1)
  std::string text;                                       // kStr
  std::vector<Json> items;                                // kArr
  std::vector<std::pair<std::string, Json>> fields;       // kObj, in the file's order

  const Json* get(const std::string& key) const {
    for (const auto& field : fields)
      if (field.first == key) return &field.second;
    return nullptr;
  }
};

[[noreturn]] inline void refuse(const std::string& what) { throw py::value_error(what); }

class Parser {
 public:
  Parser(const char* begin, const char* end) : p_(begin), end_(end) {}

  Json document() {
    Json value = parse(0);
    skip_space();
    if (p_ != end_) refuse("data after the JSON header");
    return value;
  }

 private:
  const char* p_;
  const char* end_;

  void skip_space() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  char peek() {
    skip_space();
    if (p_ == end_) refuse("the JSON header ends early");
    return *p_;
  }
  void expect(char c) {
    if (peek() != c) refuse(std::string("the JSON header lacks a '") + c + "'");
    ++p_;
  }
  bool literal(const char* word) {
    const size_t n = std::char_traits<char>::length(word);
    if (static_cast<size_t>(end_ - p_) < n || std::char_traits<char>::compare(p_, word, n) != 0) return false;
    p_ += n;
    return true;
  }

  Json parse(int depth) {
    if (depth > 8) refuse("the JSON header nests deeper than a packed file's");
    Json value;
    const char c = peek();
    if (c == '{') {
      ++p_;
      value.kind = Json::kObj;
      if (peek() == '}') { ++p_; return value; }
      std::unordered_set<std::string> seen;          // (the header's own object holds every tensor's key)
      while (true) {
        if (peek() != '"') refuse("a JSON object key is not a string");
        std::string key = string();
        if (!seen.insert(key).second) refuse("the JSON header names '" + key + "' twice in one object");
        expect(':');
        value.fields.emplace_back(std::move(key), parse(depth + 1));
        const char next = peek();
        ++p_;
        if (next == '}') return value;
        if (next != ',') refuse("a JSON object's entries are not separated by ','");
      }
    }
    if (c == '[') {
      ++p_;
      value.kind = Json::kArr;
      if (peek() == ']') { ++p_; return value; }
      while (true) {
        value.items.push_back(parse(depth + 1));
        const char next = peek();
        ++p_;
        if (next == ']') return value;
        if (next != ',') refuse("a JSON array's items are not separated by ','");
      }
    }
    if (c == '"') {
      value.kind = Json::kStr;
      value.text = string();
      return value;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
      value.kind = Json::kInt;
      value.number = integer();
      return value;
    }
    if (literal("true")) { value.kind = Json::kBool; value.number = 1; return value; }
    if (literal("false")) { value.kind = Json::kBool; return value; }
    if (literal("null")) return value;
    refuse("the JSON header holds something that is not JSON");
  }

  int64_t integer() {
    const bool negative = *p_ == '-';
    if (negative) ++p_;
    if (p_ == end_ || *p_ < '0' || *p_ > '9') refuse("a JSON number without digits");
    if (*p_ == '0' && p_ + 1 < end_ && p_[1] >= '0' && p_[1] <= '9') refuse("a JSON number with a leading zero");
    uint64_t magnitude = 0;
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') {
      const uint64_t digit = static_cast<uint64_t>(*p_++ - '0');
      if (magnitude > (static_cast<uint64_t>(INT64_MAX) - digit) / 10) refuse("a JSON number beyond int64");
      magnitude = magnitude * 10 + digit;
    }
    if (p_ < end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E')) refuse("a fraction where a packed file has integers");
    return negative ? -static_cast<int64_t>(magnitude) : static_cast<int64_t>(magnitude);
  }

  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (end_ - p_ < 4) refuse("a JSON \\u escape ends early");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = *p_++;
      v <<= 4;
      if (h >= '0' && h <= '9') v |= h - '0';
      else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
      else refuse("a JSON \\u escape that is not hexadecimal");
    }
    return v;
  }

  // The string at p_ (its opening quote), unescaped, in UTF-8 (the caller's py::str refuses invalid UTF-8).
  std::string string() {
    ++p_;
    std::string out;
    while (true) {
      const char* run = p_;
      while (p_ < end_ && *p_ != '"' && *p_ != '\\' && static_cast<unsigned char>(*p_) >= 0x20) ++p_;
      out.append(run, p_);
      if (p_ == end_) refuse("a JSON string is not closed");
      const char c = *p_++;
      if (c == '"') return out;
      if (c != '\\') refuse("a control character inside a JSON string");
      if (p_ == end_) refuse("a JSON escape ends early");
      const char e = *p_++;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && end_ - p_ >= 6 && p_[0] == '\\' && p_[1] == 'u') {
            const char* back = p_;
            p_ += 2;
            const uint32_t low = hex4();
            if (low >= 0xDC00 && low < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            else p_ = back;                      // a lone high surrogate: kept as Python keeps it (refused below)
          }
          if (cp >= 0xD800 && cp < 0xE000) refuse("a lone UTF-16 surrogate in a JSON string");
          put_utf8(out, cp);
          break;
        }
        default: refuse("an unknown JSON escape");
      }
    }
  }
};

// Bytes per element of a safetensors dtype name, and its torch dtype; false for a name this reader does not map.
inline bool dtype_of(const std::string& name, int64_t* size, at::ScalarType* type) {
  static const std::map<std::string, std::pair<int64_t, at::ScalarType>> kTypes = {
      {"F64", {8, at::kDouble}}, {"F32", {4, at::kFloat}}, {"F16", {2, at::kHalf}}, {"BF16", {2, at::kBFloat16}},
      {"I64", {8, at::kLong}}, {"I32", {4, at::kInt}}, {"I16", {2, at::kShort}}, {"I8", {1, at::kChar}},
      {"U8", {1, at::kByte}}, {"BOOL", {1, at::kBool}}};
  const auto it = kTypes.find(name);
  if (it == kTypes.end()) return false;
  *size = it->second.first;
  *type = it->second.second;
  return true;
}

struct Entry {
  std::string key;
  std::string dtype;
  int64_t size = 0;                  // bytes per element
  at::ScalarType type = at::kByte;
  std::vector<int64_t> shape;
  int64_t begin = 0, end = 0;        // data_offsets, from the data section's start
  bool transposed = false;
};

inline int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d != 0 && n > INT64_MAX / d) refuse("a tensor's shape overflows int64");
    n *= d;
  }
  return n;
}

// (the tensors, in the header's order, each a view of `data`; the metadata) of the packed file mapped as `data`
// (uint8 [length], the whole file; what keeps the mapping open): map_packed's Python path in one call. Raises
// ValueError, naming `path`, where that path raises it.
inline std::tuple<py::dict, py::dict> packed_views(const torch::Tensor& data, const std::string& format,
                                                   const std::string& path) {
  TORCH_CHECK(data.dim() == 1 && data.is_contiguous() && data.scalar_type() == at::kByte && data.device().is_cpu(),
              "packed_views: data must be a contiguous 1-D uint8 CPU tensor");
  const int64_t length = data.numel();
  const auto* bytes = data.data_ptr<uint8_t>();
  if (length < 8) refuse(path + ": shorter than a safetensors header");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];          // little-endian u64
  if (header_len > static_cast<uint64_t>(std::min<int64_t>(length - 8, int64_t{1} << 24)))
    refuse(path + ": header length " + std::to_string(header_len) + " does not fit the file");
  const char* text = reinterpret_cast<const char*>(bytes + 8);
  Json header;
  try {
    header = Parser(text, text + header_len).document();
  } catch (py::value_error& exc) {
    refuse(path + ": " + exc.what());
  }
  if (header.kind != Json::kObj) refuse(path + ": the header is not a JSON object");
  py::dict metadata;
  std::unordered_set<std::string> transposed;
  bool packed = false;
  for (const auto& field : header.fields) {
    if (field.first != "__metadata__") continue;
    if (field.second.kind == Json::kNull) break;
    if (field.second.kind != Json::kObj) refuse(path + ": its metadata is not a JSON object");
    for (const auto& item : field.second.fields) {
      if (item.second.kind != Json::kStr) refuse(path + ": metadata '" + item.first + "' is not a string");
      metadata[py::str(item.first)] = py::str(item.second.text);
      if (item.first == "format") packed = item.second.text == format;
      if (item.first == "transposed") {
        Json list;
        try {
          list = Parser(item.second.text.data(), item.second.text.data() + item.second.text.size()).document();
        } catch (py::value_error& exc) {
          refuse(path + ": its transposed list: " + exc.what());
        }
        if (list.kind != Json::kArr) refuse(path + ": its transposed list is not a JSON array");
        for (const auto& name : list.items) {
          if (name.kind != Json::kStr) refuse(path + ": its transposed list holds a non-string");
          transposed.insert(name.text);
        }
      }
    }
  }
  if (!packed) refuse(path + ": not a packed adapter file");
  const int64_t base = 8 + static_cast<int64_t>(header_len);
  std::vector<Entry> entries;
  entries.reserve(header.fields.size());
  int64_t data_end = 0;
  for (const auto& field : header.fields) {
    if (field.first == "__metadata__") continue;
    const Json& spec = field.second;
    Entry e;
    e.key = field.first;
    const Json* dtype = spec.kind == Json::kObj ? spec.get("dtype") : nullptr;
    const Json* shape = spec.kind == Json::kObj ? spec.get("shape") : nullptr;
    const Json* offsets = spec.kind == Json::kObj ? spec.get("data_offsets") : nullptr;
    if (dtype == nullptr || dtype->kind != Json::kStr || !dtype_of(dtype->text, &e.size, &e.type))
      refuse(path + ": " + e.key + " has dtype " + (dtype != nullptr && dtype->kind == Json::kStr ?
                                                      "'" + dtype->text + "'" : std::string("none")));
    e.dtype = dtype->text;
    if (shape == nullptr || shape->kind != Json::kArr) refuse(path + ": " + e.key + " has no shape");
    for (const auto& d : shape->items) {
      if (d.kind != Json::kInt) refuse(path + ": " + e.key + "'s shape is not integers");
      e.shape.push_back(d.number);
    }
    if (offsets == nullptr || offsets->kind != Json::kArr || offsets->items.size() != 2 ||
        offsets->items[0].kind != Json::kInt || offsets->items[1].kind != Json::kInt)
      refuse(path + ": " + e.key + " has no data_offsets pair");
    e.begin = offsets->items[0].number;
    e.end = offsets->items[1].number;
    data_end = std::max(data_end, e.end);
    e.transposed = transposed.count(e.key) != 0;
    if (e.transposed && e.shape.size() != 2)
      refuse(path + ": " + e.key + " is listed as transposed but has " + std::to_string(e.shape.size()) + " dims");
    entries.push_back(std::move(e));
  }
  if (base > INT64_MAX - data_end || base + data_end != length)
    refuse(path + ": " + std::to_string(length) + " bytes, its header says " + std::to_string(base + data_end));
  // each dtype's tensors one after another from an aligned start, each ending where its shape says
  std::map<std::string, std::vector<size_t>> runs;
  for (size_t i = 0; i < entries.size(); ++i) runs[entries[i].dtype].push_back(i);
  std::map<std::string, std::pair<torch::Tensor, int64_t>> bases;          // dtype -> (its run's view, its start)
  for (auto& run : runs) {
    auto& order = run.second;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return std::make_pair(entries[a].begin, entries[a].end) < std::make_pair(entries[b].begin, entries[b].end);
    });
    const Entry& first = entries[order.front()];
    const int64_t start = first.begin;
    if (start < 0 || start % first.size != 0) refuse(path + ": the " + run.first + " tensors do not fit the file");
    int64_t stop = start;
    for (size_t i : order) {
      const Entry& e = entries[i];
      const bool negative = std::any_of(e.shape.begin(), e.shape.end(), [](int64_t d) { return d < 0; });
      if (e.begin != stop || negative) refuse(path + ": " + e.key + " is not where the " + run.first +
                                              " tensors before it end");
      const int64_t count = element_count(e.shape);
      if (count > (INT64_MAX - stop) / e.size) refuse(path + ": " + e.key + "'s shape overflows the file");
      stop += count * e.size;
      if (e.end != stop) refuse(path + ": " + e.key + "'s offsets do not fit its shape");
    }
    if (stop > length - base) refuse(path + ": the " + run.first + " tensors do not fit the file");
    const int64_t count = (stop - start) / first.size;
    torch::Tensor view = count == 0 ? torch::empty({0}, data.options().dtype(first.type))
                                    : torch::from_blob(const_cast<uint8_t*>(bytes) + base + start, {count},
                                                       [keep = data](void*) {}, data.options().dtype(first.type));
    bases[run.first] = {view, start};
  }
  py::dict out;
  for (const Entry& e : entries) {
    const auto& held = bases[e.dtype];
    const int64_t offset = (e.begin - held.second) / e.size;
    std::vector<int64_t> sizes = e.shape, strides(e.shape.size());
    if (e.transposed) {                              // a B: Bt [r, out] stored, B [out, r] given
      sizes = {e.shape[1], e.shape[0]};
      strides = {1, e.shape[1]};
    } else {
      int64_t step = 1;
      for (size_t d = e.shape.size(); d-- > 0;) {
        strides[d] = step;
        step *= std::max<int64_t>(e.shape[d], 1);
      }
    }
    out[py::str(e.key)] = held.first.as_strided(sizes, strides, offset);
  }
  return std::make_tuple(out, metadata);
}

}  // namespace packed_header
